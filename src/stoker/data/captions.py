"""sd-scripts' caption rules: prefix and suffix, dropout, wildcards, keep tokens, shuffle, warm-up.

A pure transform from one caption string to the caption a training step sees, following
``BaseDataset.process_caption`` in sd-scripts' ``library/train_util.py`` step for step, including
its quirks (they are what users' datasets were tuned against):

- the prefix and suffix are joined with a space, not the separator, before anything else, so a
  prefix becomes part of the first tag unless it ends with the separator itself;
- a multi-line caption keeps only its first line, or one random line with ``enable_wildcard``, and
  this happens after the prefix and suffix are added, so the prefix stays with the first line and
  the suffix with the last;
- keep_tokens, keep_tokens_separator and the re-joining with ``", "`` only take effect when the
  caption is shuffled, warmed up or has tag dropout; otherwise the caption passes through as
  written, ``keep_tokens_separator`` included;
- tags are re-joined with ``", "`` whatever ``caption_separator`` is, and ``secondary_separator``
  is replaced by ``caption_separator`` only after that.

Every random choice is drawn from the ``np.random.Generator`` passed in, never from global state,
so the same generator state gives the same caption in any worker.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from stoker.errors import ConfigError

__all__ = ["CaptionRules", "process_caption"]

_WILDCARD = re.compile(r"\{([^}]+)\}")
_JOINER = ", "


@dataclass(frozen=True, slots=True, kw_only=True)
class CaptionRules:
    """Caption settings of one subset, named exactly as sd-scripts' subset keys.

    These fields are declared here only: ``stoker.data.config.SubsetConfig`` extends this class,
    and its ``caption_rules()`` returns the caption fields alone as a ``CaptionRules``.

    Attributes:
        shuffle_caption: shuffle the tags that are not kept fixed.
        caption_separator: what separates tags in the caption file.
        keep_tokens: how many leading tags stay in place (used when no keep_tokens_separator is
            in the caption).
        keep_tokens_separator: when it appears in the caption, the tags before its first
            occurrence stay first and the tags after a second occurrence stay last; it then
            overrides ``keep_tokens``. ``""`` turns it off.
        secondary_separator: joins tags that must stay together through shuffling; replaced by
            ``caption_separator`` at the end.
        enable_wildcard: pick one line of a multi-line caption at random and expand
            ``{a|b|c}`` to one of its options (``{{`` and ``}}`` are literal braces).
        caption_prefix: put before the caption with a space, when non-empty.
        caption_suffix: put after the caption with a space, when non-empty.
        caption_dropout_rate: chance that the whole caption becomes ``""``.
        caption_dropout_every_n_epochs: the whole caption is ``""`` in every n-th epoch
            (sd-scripts' 1-based epochs n, 2n, ...); 0 turns it off.
        caption_tag_dropout_rate: chance that each non-fixed tag is dropped.
        token_warmup_min: tags (after the fixed ones) shown at step 0 of the warm-up.
        token_warmup_step: step at which all tags are shown; a value below 1 is a fraction of
            ``max_train_steps``; 0 turns warm-up off.
    """

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0

    def __post_init__(self) -> None:
        for key in ("shuffle_caption", "enable_wildcard"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if not isinstance(self.caption_separator, str) or not self.caption_separator:
            raise ConfigError(
                f"caption_separator must be a non-empty string, got {self.caption_separator!r}"
            )
        if not isinstance(self.keep_tokens_separator, str):
            raise ConfigError(
                "keep_tokens_separator must be a string ('' turns it off), "
                f"got {self.keep_tokens_separator!r}"
            )
        for key in ("secondary_separator", "caption_prefix", "caption_suffix"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{key} must be a string, got {value!r}")
        for key in ("keep_tokens", "caption_dropout_every_n_epochs", "token_warmup_min"):
            value = getattr(self, key)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"{key} must be an integer >= 0, got {value!r}")
        _check_rates(self)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_rates(rules: CaptionRules) -> None:
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        value = getattr(rules, key)
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} must be a number from 0 to 1, got {value!r}")
    step = rules.token_warmup_step
    if not _is_number(step) or not (0.0 <= step < math.inf):
        raise ConfigError(
            "token_warmup_step must be a number >= 0 (below 1: a fraction of max_train_steps), "
            f"got {step!r}"
        )


def process_caption(
    caption: str,
    rules: CaptionRules,
    rng: np.random.Generator,
    *,
    epoch: int = 0,
    step: int = 0,
    max_train_steps: int | None = None,
) -> str:
    """Return the caption one training step sees, as sd-scripts' ``process_caption``.

    The order is sd-scripts': add prefix and suffix; drop the whole caption (returning ``""``)
    by ``caption_dropout_rate`` or ``caption_dropout_every_n_epochs``; take one line and expand
    wildcards; then, only when shuffling, warm-up or tag dropout is on, split into fixed head,
    flexible tags and fixed tail, cut the flexible tags for warm-up, shuffle them, drop tags, and
    join everything with ``", "``; finally replace ``secondary_separator``. See ``CaptionRules``
    for each field.

    Args:
        caption: the caption as read from its file (may hold several lines).
        rules: the subset's caption settings.
        rng: the only source of randomness, e.g. ``keyed_rng(seed, epoch, position,
            Stream.CAPTION)``. Draws happen only for the rules that are on.
        epoch: 0-based training epoch, as in ``keyed_rng``. sd-scripts counts epochs from 1 here,
            so the caption is dropped when ``(epoch + 1) % caption_dropout_every_n_epochs == 0``.
        step: optimizer steps done so far (sd-scripts' ``global_step``), for warm-up.
        max_train_steps: total optimizer steps; needed only when ``0 < token_warmup_step < 1``.

    Raises:
        ConfigError: ``token_warmup_step`` is a fraction but ``max_train_steps`` is missing.
    """
    if rules.caption_prefix:
        caption = rules.caption_prefix + " " + caption
    if rules.caption_suffix:
        caption = caption + " " + rules.caption_suffix
    if _is_dropped(rules, rng, epoch):
        return ""
    # Without wildcards sd-scripts keeps the first line; with them, one line at random.
    caption = _expand_wildcards(caption, rng) if rules.enable_wildcard else caption.split("\n")[0]
    if rules.shuffle_caption or rules.token_warmup_step > 0 or rules.caption_tag_dropout_rate > 0:
        caption = _rearrange_tags(caption, rules, rng, step, max_train_steps)
    if rules.secondary_separator:
        caption = caption.replace(rules.secondary_separator, rules.caption_separator)
    return caption


def _rearrange_tags(
    caption: str,
    rules: CaptionRules,
    rng: np.random.Generator,
    step: int,
    max_train_steps: int | None,
) -> str:
    """Warm-up cut, shuffle and tag dropout of the flexible tags; re-join all with ``", "``."""
    head, flex, tail = _split_tags(caption, rules)
    flex = flex[: _warmup_count(len(flex), rules, step, max_train_steps)]
    if rules.shuffle_caption:
        flex = [flex[i] for i in rng.permutation(len(flex)).tolist()]
    if rules.caption_tag_dropout_rate > 0:
        draws = rng.random(len(flex)).tolist()
        rate = rules.caption_tag_dropout_rate
        flex = [tag for tag, draw in zip(flex, draws, strict=True) if draw >= rate]
    return _JOINER.join(head + flex + tail)


def _is_dropped(rules: CaptionRules, rng: np.random.Generator, epoch: int) -> bool:
    # The rate is drawn first and only when on, so every_n_epochs never changes the draws.
    dropped = rules.caption_dropout_rate > 0 and rng.random() < rules.caption_dropout_rate
    every = rules.caption_dropout_every_n_epochs
    return bool(dropped or (every > 0 and (epoch + 1) % every == 0))


def _expand_wildcards(caption: str, rng: np.random.Generator) -> str:
    """Pick one line, then replace each ``{a|b}`` by one option; ``{{`` / ``}}`` stay literal."""
    if "\n" in caption:
        lines = caption.split("\n")
        caption = lines[int(rng.integers(len(lines)))]
    # Escaped braces are parked on stand-ins that cannot occur in the caption, so the pattern
    # never sees them; the stand-ins grow until they are absent.
    open_mark, close_mark = "\ue000", "\ue001"
    while open_mark in caption or close_mark in caption:
        open_mark += "\ue000"
        close_mark += "\ue001"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)

    def choose(match: re.Match[str]) -> str:
        options = match.group(1).split("|")
        return options[int(rng.integers(len(options)))]

    caption = _WILDCARD.sub(choose, caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _split_tags(caption: str, rules: CaptionRules) -> tuple[list[str], list[str], list[str]]:
    """Split into fixed head, flexible tags and fixed tail, with sd-scripts' treatment of blanks.

    With ``keep_tokens_separator`` present, empty tags are dropped from all three parts. Without
    it, the caption is split on ``caption_separator`` as is and empty tags are kept (so ``"a,,b"``
    re-joins as ``"a, , b"``), and the first ``keep_tokens`` tags are the head.
    """
    sep, keep_sep = rules.caption_separator, rules.keep_tokens_separator
    if keep_sep and keep_sep in caption:
        head_part, flex_part = caption.split(keep_sep, 1)
        tail_part = ""
        if keep_sep in flex_part:
            flex_part, tail_part = flex_part.split(keep_sep, 1)
        return _nonblank(head_part, sep), _nonblank(flex_part, sep), _nonblank(tail_part, sep)
    tags = [tag.strip() for tag in caption.strip().split(sep)]
    if rules.keep_tokens > 0:
        return tags[: rules.keep_tokens], tags[rules.keep_tokens :], []
    return [], tags, []


def _nonblank(part: str, sep: str) -> list[str]:
    return [tag.strip() for tag in part.split(sep) if tag.strip()]


def _warmup_count(
    available: int, rules: CaptionRules, step: int, max_train_steps: int | None
) -> int | None:
    """How many flexible tags warm-up shows at ``step``; None for all.

    sd-scripts: ``floor(step * (available - token_warmup_min) / warmup_step) + token_warmup_min``
    while ``step < warmup_step``, where a ``token_warmup_step`` below 1 first becomes
    ``floor(token_warmup_step * max_train_steps)``.
    """
    warmup_step: float = rules.token_warmup_step
    if warmup_step < 1:
        if warmup_step > 0 and max_train_steps is None:
            raise ConfigError(
                f"token_warmup_step {warmup_step} is a fraction of max_train_steps; "
                "pass max_train_steps to process_caption"
            )
        warmup_step = math.floor(warmup_step * (max_train_steps or 0))
    if not warmup_step or step >= warmup_step:
        return None
    minimum = rules.token_warmup_min
    return math.floor(step * ((available - minimum) / warmup_step)) + minimum
