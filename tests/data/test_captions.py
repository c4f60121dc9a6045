"""Caption rules behave as sd-scripts' BaseDataset.process_caption, drawing only from the given rng."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.data.captions import CaptionRules, process_caption
from stoker.errors import ConfigError
from stoker.rng import Stream, keyed_rng


def _rng(position: int = 0) -> np.random.Generator:
    return keyed_rng(1234, 0, position, Stream.CAPTION)


def _outputs(caption: str, rules: CaptionRules, n: int = 200, **kwargs) -> set[str]:
    return {process_caption(caption, rules, _rng(i), **kwargs) for i in range(n)}


# --- pass-through and affixes ----------------------------------------------------------------


def test_defaults_pass_the_first_line_through():
    assert process_caption("cat,dog ,  tree", CaptionRules(), _rng()) == "cat,dog ,  tree"
    assert process_caption("a, b\nc, d", CaptionRules(), _rng()) == "a, b"


def test_prefix_and_suffix_are_joined_with_a_space():
    rules = CaptionRules(caption_prefix="sks", caption_suffix="style")
    assert process_caption("cat, dog", rules, _rng()) == "sks cat, dog style"


def test_empty_prefix_is_ignored():
    assert process_caption("cat", CaptionRules(caption_prefix=""), _rng()) == "cat"


def test_multiline_suffix_goes_with_the_last_line_and_is_lost():
    # sd-scripts adds the affixes before it keeps the first line.
    rules = CaptionRules(caption_prefix="P", caption_suffix="S")
    assert process_caption("a, b\nc, d", rules, _rng()) == "P a, b"


def test_prefix_joins_the_first_tag_under_keep_tokens():
    # "sks" + " " + "cat, dog, tree": the first tag is "sks cat", so keep_tokens=1 keeps both.
    rules = CaptionRules(caption_prefix="sks", keep_tokens=1, shuffle_caption=True)
    for out in _outputs("cat, dog, tree", rules, n=30):
        assert out.startswith("sks cat, ")
    rules = CaptionRules(caption_prefix="sks,", keep_tokens=1, shuffle_caption=True)
    assert {out.split(", ")[0] for out in _outputs("cat, dog, tree", rules, n=30)} == {"sks"}


# --- dropout ---------------------------------------------------------------------------------


def test_dropout_rate_one_drops_everything_and_zero_nothing():
    assert process_caption("a, b", CaptionRules(caption_dropout_rate=1.0), _rng()) == ""
    assert process_caption("a, b", CaptionRules(caption_dropout_rate=0.0), _rng()) == "a, b"


def test_dropout_rate_half_drops_some():
    outs = [
        process_caption("a", CaptionRules(caption_dropout_rate=0.5), _rng(i)) for i in range(400)
    ]
    assert 120 < outs.count("") < 280


def test_rules_that_are_off_draw_nothing():
    rng = _rng()
    before = rng.bit_generator.state
    process_caption("a, b, c", CaptionRules(), rng)
    assert rng.bit_generator.state == before


@pytest.mark.parametrize(
    ("every", "dropped_epochs"),
    [(1, [0, 1, 2, 3, 4, 5]), (2, [1, 3, 5]), (3, [2, 5])],
)
def test_every_n_epochs_counts_epochs_from_one_like_sd_scripts(every, dropped_epochs):
    rules = CaptionRules(caption_dropout_every_n_epochs=every)
    dropped = [e for e in range(6) if process_caption("a", rules, _rng(), epoch=e) == ""]
    assert dropped == dropped_epochs


def test_dropout_drops_prefix_too():
    rules = CaptionRules(caption_prefix="sks", caption_dropout_rate=1.0)
    assert process_caption("cat", rules, _rng()) == ""


# --- wildcards -------------------------------------------------------------------------------


def test_wildcards_pick_each_option():
    rules = CaptionRules(enable_wildcard=True)
    assert _outputs("{red|blue|green} car, road", rules) == {
        "red car, road",
        "blue car, road",
        "green car, road",
    }


def test_wildcard_off_leaves_braces():
    assert process_caption("{red|blue} car", CaptionRules(), _rng()) == "{red|blue} car"


def test_doubled_braces_are_literal():
    rules = CaptionRules(enable_wildcard=True)
    assert process_caption("{{red|blue}} car", rules, _rng()) == "{red|blue} car"
    assert _outputs("{{x}} {a|b}", rules) == {"{x} a", "{x} b"}


def test_wildcard_placeholders_never_leak():
    rules = CaptionRules(enable_wildcard=True)
    caption = "\ue000 \ue001 {{a}} {b|c}"
    assert _outputs(caption, rules) == {"\ue000 \ue001 {a} b", "\ue000 \ue001 {a} c"}


def test_wildcard_picks_one_line():
    rules = CaptionRules(enable_wildcard=True, caption_prefix="P")
    assert _outputs("a, b\nc, d\ne", rules) == {"P a, b", "c, d", "e"}


# --- keep tokens, separators, shuffle --------------------------------------------------------


def test_keep_tokens_separator_fixes_head_and_tail():
    rules = CaptionRules(shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=3)
    outs = _outputs("a, b ||| c, d, e ||| f, g", rules)
    assert len(outs) == 6  # every order of c, d, e; keep_tokens is overridden
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["a", "b"] and tags[-2:] == ["f", "g"]
        assert sorted(tags[2:5]) == ["c", "d", "e"]


def test_keep_tokens_separator_stays_when_nothing_shuffles():
    rules = CaptionRules(keep_tokens_separator="|||", keep_tokens=1)
    assert process_caption("a ||| b, c", rules, _rng()) == "a ||| b, c"


def test_keep_tokens_separator_absent_falls_back_to_keep_tokens():
    rules = CaptionRules(shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=1)
    for out in _outputs("a, b, c", rules, n=30):
        assert out.startswith("a, ")


def test_keep_tokens_separator_drops_blank_tags_but_plain_split_keeps_them():
    rules = CaptionRules(shuffle_caption=True, keep_tokens_separator="|||")
    assert process_caption("a,, ||| ,b,", rules, _rng()) == "a, b"
    plain = CaptionRules(shuffle_caption=True)
    assert sorted(process_caption(" a,,b ", plain, _rng()).split(", ")) == ["", "a", "b"]


def test_tags_are_rejoined_with_comma_space_whatever_the_separator():
    rules = CaptionRules(shuffle_caption=True, caption_separator=";")
    out = process_caption("a;b ; c", rules, _rng())
    assert sorted(out.split(", ")) == ["a", "b", "c"]


def test_secondary_separator_keeps_groups_together():
    rules = CaptionRules(shuffle_caption=True, secondary_separator=";;;")
    outs = _outputs("red;;;hair, blue;;;eyes, smile", rules)
    assert len(outs) == 6
    for out in outs:
        # replaced by caption_separator (no space) after the ", " join
        assert sorted(out.split(", ")) == ["blue,eyes", "red,hair", "smile"]


def test_secondary_separator_applies_without_shuffle():
    rules = CaptionRules(secondary_separator=";;;")
    assert process_caption("red;;;hair, smile", rules, _rng()) == "red,hair, smile"


# --- tag dropout -----------------------------------------------------------------------------


def test_tag_dropout_one_keeps_only_fixed_tags():
    rules = CaptionRules(caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert process_caption("a, b, c", rules, _rng()) == "a"
    rules = CaptionRules(caption_tag_dropout_rate=1.0, keep_tokens_separator="|||")
    assert process_caption("a ||| b, c ||| d", rules, _rng()) == "a, d"


def test_tag_dropout_keeps_order_and_drops_some():
    rules = CaptionRules(caption_tag_dropout_rate=0.5)
    outs = _outputs("a, b, c, d", rules)
    assert "a, b, c, d" in outs and "" in outs
    for out in outs:
        tags = [t for t in out.split(", ") if t]
        assert tags == sorted(tags)


# --- warm-up ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, "k, a"),  # floor(0) + 1 tag
        (4, "k, a, b"),  # floor(4 * (5 - 1) / 10) + 1 = 2
        (5, "k, a, b, c"),  # floor(5 * 0.4) + 1 = 3
        (9, "k, a, b, c, d"),  # floor(3.6) + 1 = 4
        (10, "k, a, b, c, d, e"),  # warm-up over
        (99, "k, a, b, c, d, e"),
    ],
)
def test_warmup_counts(step, expected):
    rules = CaptionRules(token_warmup_step=10, token_warmup_min=1, keep_tokens=1)
    assert process_caption("k, a, b, c, d, e", rules, _rng(), step=step) == expected


def test_warmup_fraction_of_max_train_steps():
    rules = CaptionRules(token_warmup_step=0.5, token_warmup_min=2)
    # floor(0.5 * 20) = 10 steps; at step 5: floor(5 * (4 - 2) / 10) + 2 = 3
    assert process_caption("a, b, c, d", rules, _rng(), step=5, max_train_steps=20) == "a, b, c"
    with pytest.raises(ConfigError, match="max_train_steps"):
        process_caption("a, b", rules, _rng(), step=5)


def test_warmup_min_above_tag_count_keeps_all():
    rules = CaptionRules(token_warmup_step=10, token_warmup_min=5)
    assert process_caption("a, b", rules, _rng(), step=3) == "a, b"


# --- determinism -----------------------------------------------------------------------------


def test_same_rng_seed_same_caption():
    rules = CaptionRules(
        shuffle_caption=True,
        caption_tag_dropout_rate=0.3,
        enable_wildcard=True,
        caption_dropout_rate=0.1,
    )
    caption = "{a|b|c}, d, e, f, g, h\ni, j, k"
    first = [process_caption(caption, rules, _rng(i)) for i in range(50)]
    again = [process_caption(caption, rules, _rng(i)) for i in range(50)]
    assert first == again
    assert len(set(first)) > 10


# --- properties ------------------------------------------------------------------------------

tag = st.text(alphabet="abcxyz -_", min_size=1, max_size=8).map(str.strip).filter(bool)
tag_lists = st.lists(tag, min_size=1, max_size=12)


@settings(derandomize=True, deadline=None)
@given(tags=tag_lists, keep=st.integers(0, 14), seed=st.integers(0, 2**32))
def test_keep_tokens_prefix_survives_shuffle(tags, keep, seed):
    rules = CaptionRules(shuffle_caption=True, keep_tokens=keep)
    rng = keyed_rng(seed, 0, 0, Stream.CAPTION)
    out = process_caption(", ".join(tags), rules, rng).split(", ")
    assert out[:keep] == tags[:keep]


@settings(derandomize=True, deadline=None)
@given(tags=tag_lists, seed=st.integers(0, 2**32), sep=st.sampled_from([",", ";", " / "]))
def test_shuffle_is_a_permutation(tags, seed, sep):
    rules = CaptionRules(shuffle_caption=True, caption_separator=sep)
    rng = keyed_rng(seed, 0, 0, Stream.CAPTION)
    out = process_caption(sep.join(tags), rules, rng)
    assert sorted(out.split(", ")) == sorted(tags)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"caption_dropout_rate": 1.5}, "caption_dropout_rate"),
        ({"caption_dropout_rate": -0.1}, "caption_dropout_rate"),
        ({"caption_dropout_rate": float("nan")}, "caption_dropout_rate"),
        ({"caption_tag_dropout_rate": 2}, "caption_tag_dropout_rate"),
        ({"caption_dropout_every_n_epochs": -1}, "caption_dropout_every_n_epochs"),
        ({"keep_tokens": -1}, "keep_tokens"),
        ({"keep_tokens": 1.5}, "keep_tokens"),
        ({"token_warmup_min": -2}, "token_warmup_min"),
        ({"token_warmup_step": -1}, "token_warmup_step"),
        ({"token_warmup_step": float("inf")}, "token_warmup_step"),
        ({"caption_separator": ""}, "caption_separator"),
        ({"keep_tokens_separator": None}, "keep_tokens_separator"),
        ({"shuffle_caption": "yes"}, "shuffle_caption"),
        ({"caption_prefix": 3}, "caption_prefix"),
    ],
)
def test_rules_reject_bad_values_naming_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        CaptionRules(**kwargs)
