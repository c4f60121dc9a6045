"""Aspect-ratio buckets: which bucket each image goes to and what size it is resized to, as sd-scripts.

Pure arithmetic on image sizes, vectorised with numpy so a million images take milliseconds. The
results equal those of sd-scripts' ``library/train_util.py`` ``BucketManager.select_bucket`` and
``library/model_util.py`` ``make_bucket_resolutions``, including their rounding, with one addition:
images that sd-scripts cannot bucket (it divides by zero or makes a zero-sized bucket) are marked
not ``ok`` with a plain reason instead of crashing. There are three modes:

- **predefined** (``enable_bucket=True, no_upscale=False``): a fixed list of buckets of about the
  area of ``resolution``; each image takes the bucket whose aspect ratio is closest to its own (an
  image whose size is itself on the list takes that bucket) and is scaled up or down to cover it.
- **no_upscale** (``enable_bucket=True, no_upscale=True``): each image makes its own bucket. Images
  larger than the area of ``resolution`` are first scaled down to that area; the bucket is the
  (possibly resized) size rounded down to multiples of ``reso_steps``, so nothing is enlarged.
- **fixed** (``enable_bucket=False``): one bucket, ``resolution`` itself; each image is scaled to
  cover it and then cropped, exactly like predefined mode with a one-entry list.

In every mode the image is later cropped from ``resized_wh`` to ``bucket_wh``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stoker.errors import ConfigError

__all__ = [
    "BucketAssignment",
    "BucketProblem",
    "BucketReport",
    "BucketSpec",
    "BucketStat",
    "assign_buckets",
    "bucket_report",
    "make_buckets",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class BucketSpec:
    """How a dataset is bucketed; the fields map one to one onto sd-scripts' dataset keys.

    Attributes:
        resolution: ``(width, height)`` of the training resolution (sd-scripts ``resolution``).
            Its area is the maximum bucket area; without bucketing it is the one bucket.
        enable_bucket: sd-scripts ``enable_bucket``. When false, the other fields are ignored,
            as sd-scripts does (it even forces ``bucket_no_upscale`` off).
        min_reso: sd-scripts ``min_bucket_reso``: shortest bucket side in predefined mode.
            sd-scripts rounds it down to a multiple of ``reso_steps``; so does ``make_buckets``.
        max_reso: sd-scripts ``max_bucket_reso``: longest bucket side in predefined mode,
            rounded up to a multiple of ``reso_steps``.
        reso_steps: sd-scripts ``bucket_reso_steps``: bucket sides are multiples of it.
        no_upscale: sd-scripts ``bucket_no_upscale``: per-image buckets, never enlarging.
    """

    resolution: tuple[int, int]
    enable_bucket: bool
    min_reso: int = 256
    max_reso: int = 1024
    reso_steps: int = 64
    no_upscale: bool = False

    def __post_init__(self) -> None:
        res = self.resolution
        if not (
            isinstance(res, tuple) and len(res) == 2 and all(_is_int(v) and v > 0 for v in res)
        ):
            raise ConfigError(
                f"resolution must be (width, height) with two positive integers, got {res!r}"
            )
        for key, value in (
            ("min_bucket_reso", self.min_reso),
            ("max_bucket_reso", self.max_reso),
            ("bucket_reso_steps", self.reso_steps),
        ):
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        if self.min_reso > self.max_reso:
            raise ConfigError(
                f"min_bucket_reso {self.min_reso} is larger than max_bucket_reso {self.max_reso}; "
                "lower min_bucket_reso or raise max_bucket_reso"
            )
        if self.enable_bucket:
            _check_bounds_cover_resolution(self)

    @property
    def max_area(self) -> int:
        """Width times height of ``resolution``: the largest bucket area."""
        return self.resolution[0] * self.resolution[1]

    def bucket_bounds(self) -> tuple[int, int]:
        """``(min_reso, max_reso)`` snapped outwards to multiples of ``reso_steps``, as sd-scripts.

        sd-scripts' ``adjust_min_max_bucket_reso_by_steps`` rounds the minimum down and the maximum
        up, then uses the adjusted values for the bucket list.
        """
        steps = self.reso_steps
        low = self.min_reso - self.min_reso % steps
        high = self.max_reso + (-self.max_reso) % steps
        return low, high


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_bounds_cover_resolution(spec: BucketSpec) -> None:
    # sd-scripts asserts both after snapping to steps and refuses to train otherwise, so a config
    # that fails here has no meaning we could honour.
    low, high = spec.bucket_bounds()
    if min(spec.resolution) < low:
        raise ConfigError(
            f"min_bucket_reso {spec.min_reso} (snapped to {low} by bucket_reso_steps "
            f"{spec.reso_steps}) is larger than the shorter side of resolution {spec.resolution}; "
            "lower min_bucket_reso or raise resolution"
        )
    if max(spec.resolution) > high:
        raise ConfigError(
            f"max_bucket_reso {spec.max_reso} (snapped to {high} by bucket_reso_steps "
            f"{spec.reso_steps}) is smaller than the longer side of resolution {spec.resolution}; "
            "raise max_bucket_reso or lower resolution"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class BucketAssignment:
    """Where each of n images goes; row i describes image i. Arrays are read-only.

    Attributes:
        bucket_wh: ``(n, 2)`` int64 bucket ``(width, height)``; ``(0, 0)`` where not ``ok``.
        resized_wh: ``(n, 2)`` int64 size the image is resized to before the crop to its bucket;
            always covers the bucket. ``(0, 0)`` where not ``ok``.
        ar_error: ``(n,)`` float64 signed aspect-ratio error, bucket w/h minus image w/h, as
            sd-scripts' ``select_bucket`` returns it; ``0.0`` where not ``ok``.
        ok: ``(n,)`` bool, whether the image can be trained on.
        reasons: one plain sentence per image saying why it is not ``ok``; ``""`` when it is.
    """

    bucket_wh: np.ndarray
    resized_wh: np.ndarray
    ar_error: np.ndarray
    ok: np.ndarray
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class BucketStat:
    """One bucket in a ``BucketReport``: its size, its images (without repeats), their mean
    absolute aspect-ratio error."""

    width: int
    height: int
    count: int
    mean_ar_error: float


@dataclass(frozen=True, slots=True, kw_only=True)
class BucketProblem:
    """An image that cannot be bucketed: its row in the assignment and why."""

    index: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BucketReport:
    """Summary of a ``BucketAssignment``; ``dataclasses.asdict`` of it is JSON-ready.

    Attributes:
        buckets: one entry per bucket that holds at least one image, sorted by (width, height)
            as sd-scripts lists them.
        total_images: images assigned, ok or not.
        ok_images: images that landed in a bucket.
        mean_ar_error: mean absolute aspect-ratio error over ok images, 0.0 when there are none
            (sd-scripts' ``mean_img_ar_error``, counted without repeats like it).
        problems: every image that is not ok, in row order.
    """

    buckets: tuple[BucketStat, ...]
    total_images: int
    ok_images: int
    mean_ar_error: float
    problems: tuple[BucketProblem, ...]


def make_buckets(spec: BucketSpec) -> np.ndarray:
    """Return the predefined bucket list as an ``(n, 2)`` int64 array of ``(width, height)``.

    Predefined mode follows sd-scripts' ``make_bucket_resolutions`` on the bounds of
    ``BucketSpec.bucket_bounds``: the square of side ``floor(sqrt(area) / steps) * steps``, then
    for each width from the minimum to the maximum in steps, the height
    ``min(max, floor(area // width / steps) * steps)`` when it is at least the minimum, together
    with the same bucket turned on its side. Duplicates are dropped and rows are sorted by
    (width, height). Fixed mode returns ``resolution`` alone. no_upscale mode has no predefined
    list (each image makes its own bucket), so it returns an empty ``(0, 2)`` array.
    """
    if not spec.enable_bucket:
        return np.array([spec.resolution], dtype=np.int64)
    if spec.no_upscale:
        return np.zeros((0, 2), dtype=np.int64)
    low, high = spec.bucket_bounds()
    steps, area = spec.reso_steps, spec.max_area
    # sd-scripts takes the square side through a float sqrt; kept so results match bit for bit.
    side = int(math.sqrt(area) // steps) * steps
    found = {(side, side)}
    for width in range(low, high + 1, steps):
        height = min(high, area // width // steps * steps)
        if height >= low:
            found.add((width, height))
            found.add((height, width))
    return np.array(sorted(found), dtype=np.int64).reshape(-1, 2)


def assign_buckets(sizes_wh: np.ndarray, spec: BucketSpec) -> BucketAssignment:
    """Assign each image of ``sizes_wh`` (an ``(n, 2)`` integer array of ``(width, height)``).

    The rules per mode are in the module docstring; the arithmetic is sd-scripts':

    - predefined and fixed: the bucket minimising ``|bucket_ar - image_ar|`` (the first in
      ``make_buckets`` order on a tie), unless the image size is itself a bucket. The image is
      scaled by ``bucket_h / h`` when it is wider than the bucket, else by ``bucket_w / w``, and
      each side is rounded half up: ``floor(side * scale + 0.5)``.
    - no_upscale: see ``_no_upscale``.

    An image is not ``ok`` when a side is not positive, when (with bucketing on) a side is shorter
    than ``reso_steps``, or when no_upscale rounding would leave a bucket side of zero (where
    sd-scripts raises ZeroDivisionError). Such rows hold zeros and a reason.

    Raises:
        ValueError: ``sizes_wh`` is not an ``(n, 2)`` integer array.
    """
    sizes = _as_sizes(sizes_wh)
    width, height = sizes[:, 0], sizes[:, 1]
    positive = (width > 0) & (height > 0)
    # Rows that cannot be computed get a harmless stand-in size; they are zeroed below.
    safe = np.where(positive[:, None], sizes, 1)
    if spec.enable_bucket and spec.no_upscale:
        bucket, resized, computable = _no_upscale(safe, spec)
    else:
        bucket, resized = _cover_predefined(safe, make_buckets(spec))
        computable = np.ones(len(sizes), dtype=bool)
    # A side under one step makes a zero-sized bucket in no_upscale mode. Predefined mode would
    # upscale it (40 px -> 256 px); we refuse it there too, since such files are nearly always
    # thumbnails or broken, and one rule for both modes is easier to explain. Fixed mode has no
    # steps in sd-scripts, so only a non-positive side fails there.
    min_side = spec.reso_steps if spec.enable_bucket else 1
    big_enough = (width >= min_side) & (height >= min_side)
    ok = positive & big_enough & computable & (bucket > 0).all(axis=1)
    bucket = np.where(ok[:, None], bucket, 0)
    resized = np.where(ok[:, None], resized, 0)
    ratio = safe[:, 0] / safe[:, 1]
    ar_error = np.where(ok, bucket[:, 0] / np.where(ok, bucket[:, 1], 1) - ratio, 0.0)
    reasons = _reasons(sizes, ok, positive, big_enough, spec)
    return BucketAssignment(
        bucket_wh=_frozen(bucket),
        resized_wh=_frozen(resized),
        ar_error=_frozen(ar_error),
        ok=_frozen(ok),
        reasons=reasons,
    )


def _as_sizes(sizes_wh: np.ndarray) -> np.ndarray:
    sizes = np.asarray(sizes_wh)
    if sizes.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if sizes.ndim != 2 or sizes.shape[1] != 2 or not np.issubdtype(sizes.dtype, np.integer):
        raise ValueError(
            f"sizes_wh must be an (n, 2) integer array of (width, height), "
            f"got shape {sizes.shape} dtype {sizes.dtype}"
        )
    return sizes.astype(np.int64, copy=False)


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _round_half_up(values: np.ndarray) -> np.ndarray:
    # sd-scripts writes int(x + 0.5); for the non-negative values here that is floor(x + 0.5).
    return np.floor(values + 0.5).astype(np.int64)


def _cover_predefined(sizes: np.ndarray, buckets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pick a predefined bucket per image and the size that covers it (sizes all positive)."""
    chosen = _nearest_bucket(sizes, buckets)
    exact = _exact_bucket(sizes, buckets)
    chosen = np.where(exact >= 0, exact, chosen)
    bucket = buckets[chosen]
    width, height = sizes[:, 0], sizes[:, 1]
    ratio = width / height
    wider = ratio > bucket[:, 0] / bucket[:, 1]
    scale = np.where(wider, bucket[:, 1] / height, bucket[:, 0] / width)
    resized = np.stack([_round_half_up(width * scale), _round_half_up(height * scale)], axis=1)
    return bucket, resized


def _nearest_bucket(sizes: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    """Index of the bucket with the smallest |aspect-ratio error|, first index on ties.

    Equivalent to sd-scripts' ``np.abs(bucket_ars - ar).argmin()`` per image, but O(n log b):
    after sorting the distinct bucket ratios, the closest one is a neighbour of the insertion
    point, because ``|a - x|`` rounded in float64 never decreases as ``a`` moves away from ``x``.
    """
    bucket_ar = buckets[:, 0] / buckets[:, 1]
    order = np.argsort(bucket_ar, kind="stable")
    # Equal ratios: argmin would return the lowest index, which the stable sort puts first.
    distinct_ar, first = np.unique(bucket_ar[order], return_index=True)
    distinct_idx = order[first]
    ratio = sizes[:, 0] / sizes[:, 1]
    upper = np.clip(np.searchsorted(distinct_ar, ratio), 0, len(distinct_ar) - 1)
    lower = np.clip(upper - 1, 0, len(distinct_ar) - 1)
    err_lower = np.abs(distinct_ar[lower] - ratio)
    err_upper = np.abs(distinct_ar[upper] - ratio)
    idx_lower, idx_upper = distinct_idx[lower], distinct_idx[upper]
    take_upper = (err_upper < err_lower) | ((err_upper == err_lower) & (idx_upper < idx_lower))
    chosen: np.ndarray = np.where(take_upper, idx_upper, idx_lower)
    return chosen


def _exact_bucket(sizes: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    """Index of the bucket equal to each image size, or -1 (sd-scripts prefers an exact match)."""
    limit = int(buckets.max()) + 1
    inside = (sizes < limit).all(axis=1)
    keys = np.where(inside, sizes[:, 0] * limit + sizes[:, 1], -1)
    bucket_keys = buckets[:, 0] * limit + buckets[:, 1]
    order = np.argsort(bucket_keys)
    pos = np.clip(np.searchsorted(bucket_keys[order], keys), 0, len(order) - 1)
    hit = bucket_keys[order][pos] == keys
    found: np.ndarray = np.where(hit, order[pos], -1)
    return found


def _no_upscale(sizes: np.ndarray, spec: BucketSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image buckets of no_upscale mode; returns (bucket, resized, computable).

    Images within the area of ``resolution`` keep their size. Larger ones are scaled to that area
    keeping their ratio (``w' = sqrt(area * ar)``, ``h' = area / w'``); then, as sd-scripts, either
    the width is rounded to steps and the height follows, or the height is rounded and the width
    follows, whichever gives the smaller aspect-ratio error (the height on a tie). The bucket is
    the resized size rounded down to multiples of ``reso_steps``. ``computable`` is false where one
    of the candidates has a zero side, where sd-scripts divides by zero.
    """
    steps, area = spec.reso_steps, spec.max_area
    width, height = sizes[:, 0], sizes[:, 1]
    ratio = width / height

    def to_steps(values: np.ndarray) -> np.ndarray:
        rounded = _round_half_up(values)
        snapped: np.ndarray = rounded - rounded % steps
        return snapped

    scaled_w = np.sqrt(area * ratio)
    scaled_h = area / scaled_w
    by_w_w = to_steps(scaled_w)
    by_w_h = to_steps(by_w_w / ratio)
    by_h_h = to_steps(scaled_h)
    by_h_w = to_steps(by_h_h * ratio)
    computable = (by_w_h > 0) & (by_h_h > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        err_w = np.abs(by_w_w / by_w_h - ratio)
        err_h = np.abs(by_h_w / by_h_h - ratio)
    use_w = err_w < err_h
    shrunk_w = np.where(use_w, by_w_w, _round_half_up(by_h_h * ratio))
    shrunk_h = np.where(use_w, _round_half_up(by_w_w / ratio), by_h_h)
    too_big = width * height > area
    resized = np.stack([np.where(too_big, shrunk_w, width), np.where(too_big, shrunk_h, height)], 1)
    computable = computable | ~too_big
    return resized - resized % steps, resized, computable


def _reasons(
    sizes: np.ndarray,
    ok: np.ndarray,
    positive: np.ndarray,
    big_enough: np.ndarray,
    spec: BucketSpec,
) -> tuple[str, ...]:
    reasons = [""] * len(sizes)
    steps = spec.reso_steps
    for i in np.flatnonzero(~ok).tolist():
        w, h = int(sizes[i, 0]), int(sizes[i, 1])
        if not positive[i]:
            reasons[i] = f"image is {w}x{h}; a side of zero pixels has no aspect ratio"
        elif not big_enough[i]:
            reasons[i] = (
                f"image is {w}x{h}; a side shorter than bucket_reso_steps {steps} "
                "cannot make a bucket"
            )
        else:
            rw, rh = spec.resolution
            reasons[i] = (
                f"image is {w}x{h}; scaled down to the area of resolution {rw}x{rh} a side would "
                f"be shorter than bucket_reso_steps {steps}, so it cannot make a bucket"
            )
    return tuple(reasons)


def bucket_report(assignment: BucketAssignment) -> BucketReport:
    """Count ok images per bucket with their mean absolute aspect-ratio error; list the others."""
    ok = assignment.ok
    buckets = assignment.bucket_wh[ok]
    errors = np.abs(assignment.ar_error[ok])
    stats: list[BucketStat] = []
    if len(buckets):
        # One integer key per (width, height); sorting keys sorts by (width, height) as sd-scripts,
        # and is far cheaper than np.unique over rows.
        limit = int(buckets.max()) + 1
        keys, inverse, counts = np.unique(
            buckets[:, 0] * limit + buckets[:, 1], return_inverse=True, return_counts=True
        )
        sums = np.bincount(inverse, weights=errors, minlength=len(keys))
        for key, count, total in zip(keys.tolist(), counts.tolist(), sums.tolist(), strict=True):
            w, h = divmod(key, limit)
            stats.append(BucketStat(width=w, height=h, count=count, mean_ar_error=total / count))
    problems = tuple(
        BucketProblem(index=i, reason=assignment.reasons[i]) for i in np.flatnonzero(~ok).tolist()
    )
    return BucketReport(
        buckets=tuple(stats),
        total_images=len(ok),
        ok_images=int(ok.sum()),
        mean_ar_error=float(errors.mean()) if len(errors) else 0.0,
        problems=problems,
    )
