"""Buckets equal sd-scripts' BucketManager: hand-derived numbers, a scalar oracle, properties."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.data.buckets import (
    BucketSpec,
    assign_buckets,
    bucket_report,
    make_buckets,
)
from stoker.errors import ConfigError

SD15 = BucketSpec(resolution=(512, 512), enable_bucket=True)
NO_UPSCALE = BucketSpec(resolution=(512, 512), enable_bucket=True, no_upscale=True)

# Worked by hand from make_bucket_resolutions((512, 512), 256, 1024, 64): area 262144, the square
# 512, and for widths 256..1024 the height min(1024, 262144 // w // 64 * 64), both orientations.
SD15_BUCKETS = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640),
    (448, 576), (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256),
    (896, 256), (960, 256), (1024, 256),
]  # fmt: skip


def _assign_one(size: tuple[int, int], spec: BucketSpec) -> tuple:
    """A direct, one-image reading of sd-scripts' select_bucket, as an oracle for the vector code."""
    w, h = size
    ar = w / h
    if spec.enable_bucket and spec.no_upscale:
        return _no_upscale_one(w, h, spec)
    resos = [tuple(r) for r in make_buckets(spec).tolist()]
    if (w, h) in resos:
        reso = (w, h)
    else:
        errors = [abs(bw / bh - ar) for bw, bh in resos]
        reso = resos[errors.index(min(errors))]
    scale = reso[1] / h if ar > reso[0] / reso[1] else reso[0] / w
    resized = (int(w * scale + 0.5), int(h * scale + 0.5))
    return reso, resized, reso[0] / reso[1] - ar


def _no_upscale_one(w: int, h: int, spec: BucketSpec) -> tuple | None:
    steps, ar = spec.reso_steps, w / h

    def to_steps(x: float) -> int:
        x = int(x + 0.5)
        return x - x % steps

    resized = (w, h)
    if w * h > spec.max_area:
        rw = math.sqrt(spec.max_area * ar)
        rh = spec.max_area / rw
        ww = to_steps(rw)
        wh = to_steps(ww / ar)
        hh = to_steps(rh)
        hw = to_steps(hh * ar)
        if wh == 0 or hh == 0:
            return None  # sd-scripts raises ZeroDivisionError here
        if abs(ww / wh - ar) < abs(hw / hh - ar):
            resized = (ww, int(ww / ar + 0.5))
        else:
            resized = (int(hh * ar + 0.5), hh)
    reso = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    if 0 in reso:
        return None
    return reso, resized, reso[0] / reso[1] - ar


def _row(assignment, i: int) -> tuple:
    return (
        tuple(assignment.bucket_wh[i].tolist()),
        tuple(assignment.resized_wh[i].tolist()),
        float(assignment.ar_error[i]),
    )


# --- the bucket list -------------------------------------------------------------------------


def test_sd15_bucket_list_matches_hand_derivation():
    assert [tuple(r) for r in make_buckets(SD15).tolist()] == SD15_BUCKETS


def test_bucket_list_sdxl_1024_holds_known_buckets():
    buckets = {
        tuple(r)
        for r in make_buckets(
            BucketSpec(resolution=(1024, 1024), enable_bucket=True, max_reso=2048)
        ).tolist()
    }
    # 1024*1024 // 832 = 1260 -> 1216; 1048576 // 896 = 1170 -> 1152; 1048576 // 1024 = 1024.
    assert {(1024, 1024), (832, 1216), (1216, 832), (896, 1152), (1152, 896)} <= buckets


def test_min_max_snap_to_steps_like_adjust_min_max_bucket_reso_by_steps():
    spec = BucketSpec(resolution=(512, 512), enable_bucket=True, min_reso=300, max_reso=1000)
    assert spec.bucket_bounds() == (256, 1024)
    assert [tuple(r) for r in make_buckets(spec).tolist()] == SD15_BUCKETS


def test_fixed_mode_has_one_bucket_and_no_upscale_has_none():
    fixed = BucketSpec(resolution=(512, 768), enable_bucket=False)
    assert make_buckets(fixed).tolist() == [[512, 768]]
    assert make_buckets(NO_UPSCALE).shape == (0, 2)


# --- hand-checked assignments ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "bucket", "resized", "ar_error"),
    [
        # ar 1.778: nearest 640/384 = 1.667; wider than bucket, scale 384/1080 -> 682.67 -> 683.
        ((1920, 1080), (640, 384), (683, 384), 640 / 384 - 1920 / 1080),
        # ar 0.667: nearest 384/640 = 0.6; wider than bucket, scale 640/1500 -> 426.67 -> 427.
        ((1000, 1500), (384, 640), (427, 640), 384 / 640 - 1000 / 1500),
        # Not on the list: the closest ratio is the square, scale 0.5.
        ((1024, 1024), (512, 512), (512, 512), 0.0),
        # On the list: taken as is.
        ((448, 576), (448, 576), (448, 576), 0.0),
        # Small images are scaled up in predefined mode.
        ((100, 100), (512, 512), (512, 512), 0.0),
    ],
)
def test_predefined_hand_checked(size, bucket, resized, ar_error):
    got = _row(assign_buckets(np.array([size]), SD15), 0)
    assert got[:2] == (bucket, resized)
    assert got[2] == pytest.approx(ar_error)


@pytest.mark.parametrize(
    ("size", "bucket", "resized"),
    [
        # Within the area: kept, bucket rounded down to steps.
        ((300, 200), (256, 192), (300, 200)),
        # 2000x1000: w' = sqrt(262144 * 2) = 724.08 -> 704, h 352 -> 320 (ar 2.2); h' = 362.04
        # -> 320, w 640 (ar 2.0) wins; resized (640, 320).
        ((2000, 1000), (640, 320), (640, 320)),
        ((512, 512), (512, 512), (512, 512)),
    ],
)
def test_no_upscale_hand_checked(size, bucket, resized):
    got = _row(assign_buckets(np.array([size]), NO_UPSCALE), 0)
    assert got[:2] == (bucket, resized)


def test_no_upscale_bucket_can_exceed_area_as_in_sd_scripts():
    # 67x4355 has ar 1/65; w' = 63.5 rounds to 64 and h follows as 4160, a bucket of 266240
    # pixels, more than 512*512. sd-scripts does the same; we keep its numbers.
    got = _row(assign_buckets(np.array([[67, 4355]]), NO_UPSCALE), 0)
    assert got[:2] == ((64, 4160), (64, 4160))


def test_fixed_mode_covers_then_crops_like_sd_scripts():
    spec = BucketSpec(resolution=(512, 512), enable_bucket=False, no_upscale=True)
    got = _row(assign_buckets(np.array([[1920, 1080], [40, 3000]]), spec), 0)
    assert got[:2] == ((512, 512), (910, 512))
    tiny = assign_buckets(np.array([[40, 3000]]), spec)
    assert tiny.ok.tolist() == [True]
    assert tiny.resized_wh.tolist() == [[512, 38400]]


# --- images that cannot be bucketed ----------------------------------------------------------


def test_tiny_image_is_reported_not_crashing():
    got = assign_buckets(np.array([[40, 3000], [512, 512]]), SD15)
    assert got.ok.tolist() == [False, True]
    assert got.reasons[0] == (
        "image is 40x3000; a side shorter than bucket_reso_steps 64 cannot make a bucket"
    )
    assert got.reasons[1] == ""
    assert got.bucket_wh[0].tolist() == [0, 0]


@pytest.mark.parametrize("size", [(40, 30), (63, 5000), (100000, 100), (0, 512), (512, -3)])
def test_no_upscale_degenerate_sizes_are_reported(size):
    # 100000x100 is the case where sd-scripts divides by zero: scaled to the area it is 16 high.
    got = assign_buckets(np.array([size]), NO_UPSCALE)
    assert got.ok.tolist() == [False]
    assert str(size[0]) in got.reasons[0]
    assert got.ar_error.tolist() == [0.0]


def test_rejects_non_integer_sizes():
    with pytest.raises(ValueError, match="integer"):
        assign_buckets(np.array([[1.5, 2.0]]), SD15)
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        assign_buckets(np.array([1, 2, 3]), SD15)


def test_empty_input():
    got = assign_buckets(np.zeros((0, 2), dtype=np.int64), SD15)
    assert got.bucket_wh.shape == (0, 2)
    report = bucket_report(got)
    assert (report.total_images, report.ok_images, report.mean_ar_error) == (0, 0, 0.0)


def test_assignment_arrays_are_read_only():
    got = assign_buckets(np.array([[512, 512]]), SD15)
    with pytest.raises(ValueError):
        got.bucket_wh[0, 0] = 1


# --- the spec --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"resolution": (0, 512)}, "resolution"),
        ({"resolution": (512,)}, "resolution"),
        ({"reso_steps": 0}, "bucket_reso_steps"),
        ({"min_reso": -1}, "min_bucket_reso"),
        ({"max_reso": 0}, "max_bucket_reso"),
        ({"min_reso": 1024, "max_reso": 512}, "min_bucket_reso"),
        ({"min_reso": 640}, "min_bucket_reso"),
        ({"max_reso": 256, "min_reso": 128}, "max_bucket_reso"),
    ],
)
def test_spec_rejects_bad_values_naming_the_key(kwargs, field):
    values = {"resolution": (512, 512), "enable_bucket": True, **kwargs}
    with pytest.raises(ConfigError, match=field):
        BucketSpec(**values)


def test_spec_without_bucketing_ignores_bucket_bounds():
    BucketSpec(resolution=(512, 512), enable_bucket=False, min_reso=640)


# --- report ----------------------------------------------------------------------------------


def test_report_counts_and_is_json_ready():
    sizes = np.array([[1920, 1080], [1280, 720], [512, 512], [40, 3000]])
    report = bucket_report(assign_buckets(sizes, SD15))
    assert [(b.width, b.height, b.count) for b in report.buckets] == [
        (512, 512, 1),
        (640, 384, 2),
    ]
    assert report.buckets[1].mean_ar_error == pytest.approx(abs(640 / 384 - 16 / 9))
    assert (report.total_images, report.ok_images) == (4, 3)
    assert [p.index for p in report.problems] == [3]
    text = json.dumps(dataclasses.asdict(report))
    assert json.loads(text)["buckets"][0] == {
        "width": 512,
        "height": 512,
        "count": 1,
        "mean_ar_error": 0.0,
    }


# --- properties ------------------------------------------------------------------------------

sides = st.integers(min_value=1, max_value=20_000)
sizes_lists = st.lists(st.tuples(sides, sides), min_size=1, max_size=40)


@st.composite
def specs(draw, no_upscale: bool | None = None, enable_bucket: bool = True) -> BucketSpec:
    steps = draw(st.sampled_from([8, 16, 32, 64, 128]))
    width = draw(st.integers(4, 24)) * 32
    height = draw(st.integers(4, 24)) * 32
    low = draw(st.integers(steps, min(width, height)))
    high = draw(st.integers(max(width, height), 2 * max(width, height)))
    if no_upscale is None:
        no_upscale = draw(st.booleans())
    return BucketSpec(
        resolution=(width, height),
        enable_bucket=enable_bucket,
        min_reso=low,
        max_reso=high,
        reso_steps=steps,
        no_upscale=no_upscale,
    )


@settings(derandomize=True, deadline=None, max_examples=300)
@given(sizes=sizes_lists, spec=specs())
def test_vector_code_equals_one_image_oracle(sizes, spec):
    got = assign_buckets(np.array(sizes), spec)
    for i, size in enumerate(sizes):
        expected = _assign_one(size, spec)
        too_small = min(size) < spec.reso_steps
        if expected is None or too_small:
            assert not got.ok[i]
            assert got.reasons[i]
            continue
        assert got.ok[i], got.reasons[i]
        bucket, resized, err = _row(got, i)
        assert (bucket, resized) == expected[:2]
        assert err == expected[2]


@settings(derandomize=True, deadline=None, max_examples=100)
@given(sizes=sizes_lists, spec=specs(enable_bucket=False))
def test_fixed_mode_equals_oracle(sizes, spec):
    got = assign_buckets(np.array(sizes), spec)
    assert got.ok.all()
    for i, size in enumerate(sizes):
        assert _row(got, i) == _assign_one(size, spec)


@settings(derandomize=True, deadline=None, max_examples=200)
@given(sizes=sizes_lists, spec=specs(no_upscale=False))
def test_predefined_each_ok_image_lands_in_exactly_one_listed_bucket(sizes, spec):
    buckets = make_buckets(spec)
    got = assign_buckets(np.array(sizes), spec)
    for i in np.flatnonzero(got.ok):
        matches = (buckets == got.bucket_wh[i]).all(axis=1)
        assert matches.sum() == 1
        w, h = got.bucket_wh[i].tolist()
        assert w * h <= spec.max_area
        assert w % spec.reso_steps == 0 and h % spec.reso_steps == 0
        assert (got.resized_wh[i] >= got.bucket_wh[i]).all()


@settings(derandomize=True, deadline=None, max_examples=200)
@given(sizes=sizes_lists, spec=specs(no_upscale=True))
def test_no_upscale_never_enlarges_and_buckets_are_steps(sizes, spec):
    arr = np.array(sizes)
    got = assign_buckets(arr, spec)
    ok = got.ok
    assert ((got.bucket_wh[ok] % spec.reso_steps) == 0).all()
    assert (got.bucket_wh[ok] > 0).all()
    assert (got.resized_wh[ok] >= got.bucket_wh[ok]).all()
    assert (got.resized_wh[ok] <= arr[ok]).all()
    assert (got.bucket_wh[~ok] == 0).all()


@settings(derandomize=True, deadline=None, max_examples=100)
@given(sizes=sizes_lists, spec=specs())
def test_report_totals_add_up(sizes, spec):
    got = assign_buckets(np.array(sizes), spec)
    report = bucket_report(got)
    assert sum(b.count for b in report.buckets) == report.ok_images == int(got.ok.sum())
    assert report.ok_images + len(report.problems) == report.total_images == len(sizes)
    assert [(b.width, b.height) for b in report.buckets] == sorted(
        (b.width, b.height) for b in report.buckets
    )


@pytest.mark.parametrize(
    ("buckets", "expected"),
    [
        ([[2, 1], [1, 1]], 0),  # ratio 1.5 is exactly 0.5 from both: argmin keeps the first
        ([[1, 1], [2, 1]], 0),
        ([[4, 4], [2, 1], [1, 1]], 0),  # equal ratios 1.0: the lower index
        ([[2, 1], [4, 4], [1, 1]], 0),
    ],
)
def test_nearest_bucket_breaks_ties_like_argmin(buckets, expected):
    from stoker.data.buckets import _nearest_bucket

    got = _nearest_bucket(np.array([[3, 2]]), np.array(buckets))
    ratios = np.array(buckets)[:, 0] / np.array(buckets)[:, 1]
    assert got.tolist() == [int(np.abs(ratios - 1.5).argmin())] == [expected]
