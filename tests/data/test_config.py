"""Tests for stoker.data.config: sd-scripts dataset configs, N_name folders and metadata files."""

from __future__ import annotations

import dataclasses
import json
import pickle
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.data.config import (
    DatasetConfig,
    DatasetGroupConfig,
    SubsetConfig,
    config_from_metadata,
    config_from_train_data_dir,
    load_metadata,
    parse_dataset_config,
)
from stoker.errors import ConfigError, DatasetError, StokerWarning


def write_config(folder: Path, text: str, name: str = "train.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def make_dirs(root: Path, *names: str) -> None:
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)


def parse(tmp_path: Path, text: str, **overrides: object) -> DatasetGroupConfig:
    path = write_config(tmp_path, text)
    return parse_dataset_config(path, cwd=tmp_path, **overrides)


def only_subset(group: DatasetGroupConfig) -> SubsetConfig:
    (dataset,) = group.datasets
    (subset,) = dataset.subsets
    return subset


# --- the sd-scripts example and precedence -------------------------------------------------------


def test_readme_example_parses_with_the_documented_precedence(tmp_path: Path) -> None:
    # The example from sd-scripts' docs/config_README-en.md, with paths made local.
    make_dirs(tmp_path, "hoge", "fuga", "reg", "piyo")
    (tmp_path / "piyo" / "piyo_md.json").write_text("{}", encoding="utf-8")
    group = parse(
        tmp_path,
        """
        [general]
        shuffle_caption = true
        caption_extension = '.txt'
        keep_tokens = 1

        [[datasets]]
        resolution = 512
        batch_size = 4
        keep_tokens = 2

          [[datasets.subsets]]
          image_dir = 'hoge'
          class_tokens = 'hoge girl'

          [[datasets.subsets]]
          image_dir = 'fuga'
          class_tokens = 'fuga boy'
          keep_tokens = 3

          [[datasets.subsets]]
          is_reg = true
          image_dir = 'reg'
          class_tokens = 'human'
          keep_tokens = 1

        [[datasets]]
        resolution = [768, 768]
        batch_size = 2

          [[datasets.subsets]]
          image_dir = 'piyo'
          metadata_file = 'piyo/piyo_md.json'
        """,
    )
    db, ft = group.datasets
    assert (db.kind, ft.kind) == ("dreambooth", "finetuning")
    assert (db.resolution, db.batch_size) == ((512, 512), 4)
    assert (ft.resolution, ft.batch_size) == ((768, 768), 2)
    assert [s.keep_tokens for s in db.subsets] == [2, 3, 1]
    assert [s.is_reg for s in db.subsets] == [False, False, True]
    assert all(s.shuffle_caption and s.caption_extension == ".txt" for s in db.subsets)
    assert ft.subsets[0].keep_tokens == 1
    assert ft.subsets[0].metadata_file == tmp_path / "piyo" / "piyo_md.json"
    assert group.source == tmp_path / "train.toml"


def test_precedence_subset_dataset_general_override_default(tmp_path: Path) -> None:
    make_dirs(tmp_path, "a", "b", "c", "d")
    group = parse(
        tmp_path,
        """
        [general]
        keep_tokens = 3
        caption_prefix = "general"
        batch_size = 3

        [[datasets]]
        resolution = 512
        keep_tokens = 2
        batch_size = 2
          [[datasets.subsets]]
          image_dir = "a"
          keep_tokens = 1
          [[datasets.subsets]]
          image_dir = "b"

        [[datasets]]
        resolution = 512
          [[datasets.subsets]]
          image_dir = "c"
        """,
        keep_tokens=4,
        caption_prefix="override",
        caption_suffix="override",
        batch_size=9,
    )
    first, second = group.datasets
    assert [s.keep_tokens for s in first.subsets] == [1, 2]
    assert second.subsets[0].keep_tokens == 3
    assert first.subsets[0].caption_prefix == "general"
    assert first.subsets[0].caption_suffix == "override"  # only the override sets it
    assert first.subsets[0].caption_separator == ","  # nobody sets it: the default
    assert (first.batch_size, second.batch_size) == (2, 3)


def test_overrides_use_command_line_names_and_none_means_unset(tmp_path: Path) -> None:
    make_dirs(tmp_path, "a")
    text = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n'
    group = parse(
        tmp_path,
        text,
        resolution="640,512",
        train_batch_size=5,
        dataset_repeats=7,
        caption_extention="txt",
        face_crop_aug_range=None,
        prior_loss_weight=0.5,
        debug_dataset=True,
    )
    (dataset,) = group.datasets
    subset = dataset.subsets[0]
    assert dataset.resolution == (640, 512)
    assert (dataset.batch_size, dataset.prior_loss_weight, dataset.debug_dataset) == (5, 0.5, True)
    assert (subset.num_repeats, subset.caption_extension) == (7, ".txt")
    assert subset.face_crop_aug_range is None


@settings(max_examples=40, deadline=None, derandomize=True)
@given(layers=st.lists(st.booleans(), min_size=4, max_size=4))
def test_precedence_property(tmp_path_factory: pytest.TempPathFactory, layers: list[bool]) -> None:
    # Each layer that is switched on sets keep_tokens to its own number: 1 subset, 2 dataset,
    # 3 general, 4 override. The subset must see the first one switched on, or the default 0.
    root = tmp_path_factory.mktemp("precedence")
    make_dirs(root, "a")
    subset_line, dataset_line, general_line, use_override = layers
    text = "[general]\n" + ("keep_tokens = 3\n" if general_line else "")
    text += "[[datasets]]\nresolution = 64\n" + ("keep_tokens = 2\n" if dataset_line else "")
    text += '[[datasets.subsets]]\nimage_dir = "a"\n' + ("keep_tokens = 1\n" if subset_line else "")
    overrides = {"keep_tokens": 4} if use_override else {}
    group = parse(root, text, **overrides)
    expected = next((n for n, on in zip((1, 2, 3, 4), layers, strict=True) if on), 0)
    assert only_subset(group).keep_tokens == expected


# --- every key ---------------------------------------------------------------------------------


DREAMBOOTH_SUBSET = """
  [[datasets.subsets]]
  image_dir = "imgs"
  num_repeats = 10
  is_reg = true
  class_tokens = "sks dog"
  caption_extension = ".txt"
  cache_info = true
  shuffle_caption = true
  caption_separator = ";"
  keep_tokens = 2
  keep_tokens_separator = "|||"
  secondary_separator = ";;;"
  enable_wildcard = true
  caption_prefix = "pre, "
  caption_suffix = ", post"
  caption_dropout_rate = 0.1
  caption_dropout_every_n_epochs = 3
  caption_tag_dropout_rate = 0.2
  token_warmup_min = 2
  token_warmup_step = 0.5
  flip_aug = true
  color_aug = true
  random_crop = true
  face_crop_aug_range = [2.0, 4]
  alpha_mask = true
  custom_attributes = { loss_weight = 2.0, tags = ["a", "b"] }
  resize_interpolation = "lanczos"
"""


def test_every_dreambooth_subset_key_is_accepted(tmp_path: Path) -> None:
    make_dirs(tmp_path, "imgs")
    group = parse(tmp_path, "[[datasets]]\nresolution = 512\n" + DREAMBOOTH_SUBSET)
    subset = only_subset(group)
    assert subset.image_dir == tmp_path / "imgs"
    assert (subset.num_repeats, subset.is_reg, subset.class_tokens) == (10, True, "sks dog")
    assert (subset.caption_extension, subset.cache_info) == (".txt", True)
    assert (subset.shuffle_caption, subset.caption_separator, subset.keep_tokens) == (True, ";", 2)
    assert (subset.keep_tokens_separator, subset.secondary_separator) == ("|||", ";;;")
    assert (subset.enable_wildcard, subset.caption_prefix, subset.caption_suffix) == (
        True,
        "pre, ",
        ", post",
    )
    assert (subset.caption_dropout_rate, subset.caption_dropout_every_n_epochs) == (0.1, 3)
    assert (subset.caption_tag_dropout_rate, subset.token_warmup_min) == (0.2, 2)
    assert subset.token_warmup_step == 0.5
    assert (subset.flip_aug, subset.color_aug, subset.random_crop) == (True, True, True)
    assert subset.face_crop_aug_range == (2.0, 4.0)
    assert subset.alpha_mask is True
    assert subset.custom_attributes == {"loss_weight": 2.0, "tags": ("a", "b")}
    assert subset.resize_interpolation == "lanczos"


def test_every_dataset_key_is_accepted(tmp_path: Path) -> None:
    make_dirs(tmp_path, "a")
    group = parse(
        tmp_path,
        """
        [[datasets]]
        resolution = [1024, 768]
        batch_size = 8
        enable_bucket = true
        min_bucket_reso = 320
        max_bucket_reso = 2048
        bucket_reso_steps = 32
        bucket_no_upscale = true
        network_multiplier = 0.5
        validation_split = 0.1
        validation_seed = 42
        resize_interpolation = "area"
        skip_image_resolution = 512
          [[datasets.subsets]]
          image_dir = "a"
        """,
    )
    (dataset,) = group.datasets
    assert dataset.resolution == (1024, 768)
    assert (dataset.batch_size, dataset.enable_bucket, dataset.bucket_no_upscale) == (8, True, True)
    assert (dataset.min_bucket_reso, dataset.max_bucket_reso, dataset.bucket_reso_steps) == (
        320,
        2048,
        32,
    )
    assert (dataset.network_multiplier, dataset.validation_split) == (0.5, 0.1)
    assert (dataset.validation_seed, dataset.skip_image_resolution) == (42, (512, 512))
    # resize_interpolation is both a dataset and a subset key in sd-scripts.
    assert dataset.resize_interpolation == dataset.subsets[0].resize_interpolation == "area"
    assert dataset.validation is False


def test_finetuning_and_controlnet_subset_keys(tmp_path: Path) -> None:
    make_dirs(tmp_path, "ft", "img", "cond")
    (tmp_path / "meta.json").write_text("{}", encoding="utf-8")
    group = parse(
        tmp_path,
        """
        [general]
        caption_extension = ".txt"   # ignored by the fine-tuning dataset, as in sd-scripts
        class_tokens = "thing"
        [[datasets]]
        resolution = 512
          [[datasets.subsets]]
          metadata_file = "meta.json"
          image_dir = "ft"
          alpha_mask = true
        [[datasets]]
        resolution = 512
        cache_info = true
          [[datasets.subsets]]
          image_dir = "img"
          conditioning_data_dir = "cond"
          caption_extension = "cap"
        """,
    )
    ft, cn = group.datasets
    assert (ft.kind, cn.kind) == ("finetuning", "controlnet")
    assert ft.subsets[0].alpha_mask is True
    assert ft.subsets[0].class_tokens is None and ft.subsets[0].caption_extension == ".caption"
    assert cn.subsets[0].conditioning_data_dir == tmp_path / "cond"
    assert (cn.subsets[0].caption_extension, cn.subsets[0].cache_info) == (".cap", True)
    assert cn.subsets[0].class_tokens is None  # ControlNet subsets have no class_tokens


def test_dataclass_fields_match_sd_scripts_keys() -> None:
    # Every config key has a field of the same name and every field is reachable from a config.
    subset_fields = {f.name for f in dataclasses.fields(SubsetConfig)} - {"kind", "where"}
    dataset_fields = {f.name for f in dataclasses.fields(DatasetConfig)}
    dataset_fields -= {"subsets", "validation", "where", "prior_loss_weight", "debug_dataset"}
    toml_subset_keys = {
        line.split("=")[0].strip()
        for line in DREAMBOOTH_SUBSET.splitlines()
        if "=" in line and "[[" not in line
    }
    assert subset_fields - toml_subset_keys == {"metadata_file", "conditioning_data_dir"}
    assert dataset_fields == {
        "resolution",
        "batch_size",
        "enable_bucket",
        "min_bucket_reso",
        "max_bucket_reso",
        "bucket_reso_steps",
        "bucket_no_upscale",
        "network_multiplier",
        "validation_split",
        "validation_seed",
        "resize_interpolation",
        "skip_image_resolution",
        # stoker's own keys (not sd-scripts'): where the latent and text-encoder caches live.
        "latent_cache",
        "text_cache",
    }


def test_json_config_is_read_like_toml(tmp_path: Path) -> None:
    make_dirs(tmp_path, "a")
    config = {
        "general": {"flip_aug": True},
        "datasets": [{"resolution": [512, 640], "subsets": [{"image_dir": "a", "num_repeats": 2}]}],
    }
    path = write_config(tmp_path, json.dumps(config), name="train.json")
    group = parse_dataset_config(path, cwd=tmp_path)
    subset = only_subset(group)
    assert (subset.flip_aug, subset.num_repeats) == (True, 2)
    assert group.datasets[0].resolution == (512, 640)


# --- error messages ------------------------------------------------------------------------------


def test_unknown_key_names_file_table_key_and_suggestion(tmp_path: Path) -> None:
    make_dirs(tmp_path, "a", "b")
    text = """
    [[datasets]]
    resolution = 512
      [[datasets.subsets]]
      image_dir = "a"
      [[datasets.subsets]]
      image_dir = "b"
      num_repeat = 3
    """
    with pytest.raises(ConfigError) as info:
        parse(tmp_path, text)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "train.toml"))
    assert "[[datasets]] #1 [[datasets.subsets]] #2" in message
    assert "unknown key 'num_repeat'; did you mean 'num_repeats'?" in message


@pytest.mark.parametrize(
    ("table", "line", "expected"),
    [
        ("general", "caption_extention = '.txt'", "did you mean 'caption_extension'?"),
        ("general", "shufle_caption = true", "did you mean 'shuffle_caption'?"),
        ("dataset", "bucket_reso_step = 64", "did you mean 'bucket_reso_steps'?"),
        ("dataset", "train_batch_size = 4", "did you mean 'batch_size'?"),
        ("subset", "flip_augment = true", "did you mean 'flip_aug'?"),
    ],
)
def test_unknown_keys_in_each_table(tmp_path: Path, table: str, line: str, expected: str) -> None:
    make_dirs(tmp_path, "a")
    general = line if table == "general" else ""
    dataset = line if table == "dataset" else ""
    subset = line if table == "subset" else ""
    text = (
        f"[general]\n{general}\n[[datasets]]\nresolution = 512\n{dataset}\n"
        f'[[datasets.subsets]]\nimage_dir = "a"\n{subset}\n'
    )
    with pytest.raises(ConfigError, match=expected):
        parse(tmp_path, text)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('num_repeats = "ten"', 'num_repeats must be an integer, got string "ten"'),
        ("num_repeats = true", "num_repeats must be an integer, got boolean true"),
        ("num_repeats = 2.5", "num_repeats must be an integer, got float 2.5"),
        ("flip_aug = 1", "flip_aug must be true or false, got integer 1"),
        ("class_tokens = 5", "class_tokens must be a string, got integer 5"),
        ("face_crop_aug_range = [1.0]", r"face_crop_aug_range must be \[low, high\]"),
        ("face_crop_aug_range = [3.0, 1.0]", "0 < low <= high"),
        ("custom_attributes = 1", "custom_attributes must be a table"),
        ("keep_tokens = -1", "keep_tokens = -1 is too small: it must be 0 or more"),
        ("num_repeats = -2", "num_repeats = -2 is too small"),
        ("caption_dropout_rate = 1.5", "caption_dropout_rate = 1.5 is not a probability"),
        ('resize_interpolation = "fancy"', "is not supported; use one of lanczos"),
        ('caption_separator = ""', 'caption_separator = "" must not be empty'),
        ('image_dir = ""', "image_dir must be a non-empty path string"),
    ],
)
def test_wrong_subset_values(tmp_path: Path, line: str, expected: str) -> None:
    make_dirs(tmp_path, "a")
    image_dir = "" if line.startswith("image_dir") else 'image_dir = "a"'
    text = f"[[datasets]]\nresolution = 512\n[[datasets.subsets]]\n{image_dir}\n{line}\n"
    with pytest.raises(ConfigError, match=expected) as info:
        parse(tmp_path, text)
    assert "[[datasets]] #1 [[datasets.subsets]] #1: " in str(info.value)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("resolution = [512]", r"resolution must be an integer or \[width, height\], got array"),
        ("resolution = 512.0", "resolution must be an integer or"),
        ("resolution = [0, 512]", "resolution = \\[0, 512\\] must be positive"),
        ("batch_size = 0", "batch_size = 0 is too small: it must be 1 or more"),
        ("validation_split = 1.0", "validation_split = 1.0 must be at least 0 and below 1"),
        ("validation_split = -0.1", "validation_split = -0.1 must be at least 0"),
        ('enable_bucket = "yes"', 'enable_bucket must be true or false, got string "yes"'),
        ('network_multiplier = "1"', "network_multiplier must be a number"),
    ],
)
def test_wrong_dataset_values_point_at_the_table(tmp_path: Path, line: str, expected: str) -> None:
    make_dirs(tmp_path, "a")
    text = f'[general]\n{line}\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n'
    with pytest.raises(ConfigError, match=expected) as info:
        parse(tmp_path, text)
    assert ", [general]: " in str(info.value)


def test_integers_are_accepted_where_sd_scripts_wants_floats(tmp_path: Path) -> None:
    make_dirs(tmp_path, "a")
    text = """
    [[datasets]]
    resolution = 512
    network_multiplier = 1
    validation_split = 0
    [[datasets.subsets]]
    image_dir = "a"
    caption_dropout_rate = 1
    """
    group = parse(tmp_path, text)
    assert group.datasets[0].network_multiplier == 1.0
    assert isinstance(group.datasets[0].network_multiplier, float)
    assert only_subset(group).caption_dropout_rate == 1.0


def test_json_null_is_a_type_error_with_a_hint(tmp_path: Path) -> None:
    make_dirs(tmp_path, "a")
    config = {
        "datasets": [{"resolution": 512, "subsets": [{"image_dir": "a", "keep_tokens": None}]}]
    }
    path = write_config(tmp_path, json.dumps(config), name="c.json")
    with pytest.raises(
        ConfigError, match=r"keep_tokens must be an integer, got null \(remove the key"
    ):
        parse_dataset_config(path, cwd=tmp_path)


@pytest.mark.parametrize(
    ("general", "dataset", "subset", "expected"),
    [
        (
            "",
            "",
            "batch_size = 2",
            "'batch_size' is a dataset setting shared by all its subsets; move",
        ),
        ("", "", "resolution = 512", "'resolution' is a dataset setting"),
        ("", "", "validation_split = 0.1", "'validation_split' is a dataset setting"),
        (
            'image_dir = "a"',
            "",
            "",
            r"\[general\]: 'image_dir' can only be set in a \[\[datasets.subsets",
        ),
        (
            "",
            "is_reg = true",
            "",
            r"#1: 'is_reg' can only be set in a \[\[datasets.subsets\]\] table",
        ),
        ("prior_loss_weight = 1.0", "", "", "command-line option in sd-scripts"),
    ],
)
def test_keys_in_the_wrong_table(
    tmp_path: Path, general: str, dataset: str, subset: str, expected: str
) -> None:
    make_dirs(tmp_path, "a")
    text = (
        f"[general]\n{general}\n[[datasets]]\nresolution = 512\n{dataset}\n"
        f'[[datasets.subsets]]\nimage_dir = "a"\n{subset}\n'
    )
    with pytest.raises(ConfigError, match=expected):
        parse(tmp_path, text)


def test_keys_that_do_not_apply_to_the_dataset_kind(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text("{}", encoding="utf-8")
    text = '[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nmetadata_file = "m.json"\n'
    with pytest.raises(ConfigError, match="'is_reg' does not apply to a fine-tuning subset"):
        parse(tmp_path, text + "is_reg = true\n")
    with pytest.raises(
        ConfigError, match="'caption_extension' does not apply to a fine-tuning dataset"
    ):
        parse(tmp_path, text.replace("512\n", '512\ncaption_extension = ".txt"\n', 1))


def test_mixed_kinds_in_one_dataset(tmp_path: Path) -> None:
    make_dirs(tmp_path, "a")
    (tmp_path / "m.json").write_text("{}", encoding="utf-8")
    text = """
    [[datasets]]
    resolution = 512
    [[datasets.subsets]]
    image_dir = "a"
    [[datasets.subsets]]
    metadata_file = "m.json"
    """
    with pytest.raises(ConfigError) as info:
        parse(tmp_path, text)
    message = str(info.value)
    assert "mixes subset kinds (DreamBooth: subsets #1; fine-tuning: subsets #2)" in message
    assert "separate [[datasets]] tables" in message


def test_missing_resolution_and_missing_required_keys(tmp_path: Path) -> None:
    make_dirs(tmp_path, "a")
    with pytest.raises(ConfigError, match=r"#1: resolution is not set; add resolution = 512"):
        parse(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n')
    with pytest.raises(ConfigError, match="missing image_dir, which a DreamBooth subset needs"):
        parse(tmp_path, "[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nnum_repeats = 2\n")
    with pytest.raises(ConfigError, match="missing conditioning_data_dir|missing image_dir"):
        parse(
            tmp_path,
            '[[datasets]]\nresolution = 8\n[[datasets.subsets]]\nconditioning_data_dir = "a"\n',
        )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[subsets]]\nimage_dir = "a"\n',
            r"write \[\[datasets.subsets\]\] after a \[\[datasets\]\]",
        ),
        (
            "resolution = 512\n",
            r"'resolution' must sit under \[general\] or a \[\[datasets\]\] table",
        ),
        ("[genral]\n", "unknown top-level key 'genral'; did you mean 'general'?"),
        ("[general]\n", r"no \[\[datasets\]\] table"),
        ("[datasets]\nresolution = 512\n", r"write \[\[datasets\]\], not \[datasets\]"),
        (
            "[[datasets]]\nresolution = 512\n",
            r"no \[\[datasets.subsets\]\]; add one with image_dir",
        ),
        (
            "[[datasets]]\nresolution = 512\n[datasets.subsets]\nimage_dir = 'a'\n",
            r"write \[\[datasets.subsets\]\], not \[datasets.subsets\]",
        ),
    ],
)
def test_structure_errors(tmp_path: Path, text: str, expected: str) -> None:
    make_dirs(tmp_path, "a")
    with pytest.raises(ConfigError, match=expected):
        parse(tmp_path, text)


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse(tmp_path, "[[datasets]]\nresolution = 512\nbatch_size = \n")
    assert (
        str(info.value)
        == f"{tmp_path / 'train.toml'}, line 3, column 14: invalid TOML: Invalid value"
    )


def test_toml_backslash_error_suggests_single_quotes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"line 3, column 18: .*single quotes, 'C:\\data'"):
        parse(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "C:\\hoge"\n')


def test_json_syntax_error_and_file_errors(tmp_path: Path) -> None:
    path = write_config(tmp_path, '{"datasets": [\n  {"resolution": 512,}\n]}', name="bad.json")
    with pytest.raises(ConfigError, match=r"bad.json, line 2, column 22: invalid JSON"):
        parse_dataset_config(path)
    with pytest.raises(ConfigError, match=r"missing.toml: file not found"):
        parse_dataset_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"unsupported config format '.yaml'"):
        parse_dataset_config(write_config(tmp_path, "a: 1", name="c.yaml"))
    (tmp_path / "latin1.toml").write_bytes(b"caption_prefix = '\xe9'\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        parse_dataset_config(tmp_path / "latin1.toml")


def test_byte_order_mark_is_tolerated(tmp_path: Path) -> None:
    make_dirs(tmp_path, "a")
    text = '[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "a"\n'
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert parse_dataset_config(tmp_path / "bom.toml", cwd=tmp_path).datasets[0].resolution == (
        512,
        512,
    )


# --- overrides -----------------------------------------------------------------------------------


def test_override_errors(tmp_path: Path) -> None:
    make_dirs(tmp_path, "a")
    text = '[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "a"\n'
    with pytest.raises(ConfigError, match="overrides: unknown key 'num_repeat'; did you mean"):
        parse(tmp_path, text, num_repeat=2)
    with pytest.raises(ConfigError, match="overrides: 'image_dir' can only be set in a"):
        parse(tmp_path, text, image_dir="a")
    with pytest.raises(ConfigError, match="overrides: keep_tokens must be an integer"):
        parse(tmp_path, text, keep_tokens="2")
    with pytest.raises(ConfigError, match="train_batch_size and batch_size mean the same"):
        parse(tmp_path, text, batch_size=1, train_batch_size=2)


# --- paths ---------------------------------------------------------------------------------------


def test_relative_paths_prefer_the_config_folder_then_the_working_directory(tmp_path: Path) -> None:
    config_dir, work_dir = tmp_path / "configs", tmp_path / "work"
    make_dirs(config_dir, "beside", "both")
    make_dirs(work_dir, "in_cwd", "both")
    path = write_config(
        config_dir,
        """
        [[datasets]]
        resolution = 512
        [[datasets.subsets]]
        image_dir = "beside"
        [[datasets.subsets]]
        image_dir = "in_cwd"
        [[datasets.subsets]]
        image_dir = "both"
        """,
    )
    group = parse_dataset_config(path, cwd=work_dir)
    dirs = [s.image_dir for s in group.datasets[0].subsets]
    assert dirs == [config_dir / "beside", work_dir / "in_cwd", config_dir / "both"]


def test_missing_path_names_both_places_looked(tmp_path: Path) -> None:
    config_dir, work_dir = tmp_path / "configs", tmp_path / "work"
    work_dir.mkdir()
    path = write_config(
        config_dir,
        '[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "data/cats"\n',
    )
    with pytest.raises(DatasetError) as info:
        parse_dataset_config(path, cwd=work_dir)
    message = str(info.value)
    assert "[[datasets.subsets]] #1: image_dir 'data/cats' does not exist" in message
    assert f"{config_dir / 'data' / 'cats'}, relative to {path}'s folder" in message
    assert f"{work_dir / 'data' / 'cats'}, relative to the working directory" in message


def test_absolute_paths_and_dot_dot_are_normalised(tmp_path: Path) -> None:
    make_dirs(tmp_path, "abs", "cfg")
    text = f"""
    [[datasets]]
    resolution = 512
    [[datasets.subsets]]
    image_dir = '{tmp_path / "abs"}'
    [[datasets.subsets]]
    image_dir = '../abs/../cfg'
    """
    path = write_config(tmp_path / "cfg", text)
    group = parse_dataset_config(path, cwd=tmp_path / "elsewhere")
    assert [s.image_dir for s in group.datasets[0].subsets] == [tmp_path / "abs", tmp_path / "cfg"]
    with pytest.raises(DatasetError, match="does not exist"):
        parse(tmp_path, text.replace("abs'", "nope'"))


def test_image_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("", encoding="utf-8")
    with pytest.raises(DatasetError, match="image_dir '.*a' is a file, but it must be a folder"):
        parse(tmp_path, '[[datasets]]\nresolution = 8\n[[datasets.subsets]]\nimage_dir = "a"\n')


def test_duplicate_subsets_keep_the_first_with_a_warning(tmp_path: Path) -> None:
    make_dirs(tmp_path, "a")
    text = """
    [[datasets]]
    resolution = 512
    [[datasets.subsets]]
    image_dir = "a"
    [[datasets.subsets]]
    image_dir = "./a"
    num_repeats = 5
    """
    with pytest.warns(StokerWarning, match=r"subsets\]\] #2: ignored, it reads the same data as"):
        group = parse(tmp_path, text)
    assert [s.num_repeats for s in group.datasets[0].subsets] == [1]


# --- N_name folders ------------------------------------------------------------------------------


def test_train_data_dir_folders_become_subsets(tmp_path: Path) -> None:
    make_dirs(tmp_path / "train", "10_sks dog", "3_a_b", "5")
    make_dirs(tmp_path / "reg", "1_dog")
    (tmp_path / "train" / "notes.txt").write_text("ignored", encoding="utf-8")
    group = config_from_train_data_dir(
        "train", reg_data_dir="reg", resolution=512, cwd=tmp_path, shuffle_caption=True
    )
    (dataset,) = group.datasets
    found = [(s.image_dir.name, s.num_repeats, s.class_tokens, s.is_reg) for s in dataset.subsets]
    assert found == [
        ("10_sks dog", 10, "sks dog", False),
        ("3_a_b", 3, "a_b", False),
        ("5", 5, "", False),
        ("1_dog", 1, "dog", True),
    ]
    assert all(s.shuffle_caption for s in dataset.subsets)
    assert dataset.resolution == (512, 512) and dataset.kind == "dreambooth"
    assert group.skipped_dirs == ()
    assert group.source == tmp_path / "train"
    assert dataset.subsets[0].where == "train_data_dir 'train', folder '10_sks dog'"


def test_folder_name_beats_override(tmp_path: Path) -> None:
    make_dirs(tmp_path, "2_cat")
    group = config_from_train_data_dir(
        tmp_path, resolution=(512, 768), dataset_repeats=9, class_tokens="x"
    )
    subset = only_subset(group)
    assert (subset.num_repeats, subset.class_tokens) == (2, "cat")
    assert group.datasets[0].resolution == (512, 768)


def test_badly_named_folders_are_skipped_and_reported(tmp_path: Path) -> None:
    make_dirs(tmp_path, "10_ok", "cats", "0_zero", "-1_neg")
    with pytest.warns(StokerWarning, match=r"left out 3 folder\(s\)") as record:
        group = config_from_train_data_dir(tmp_path, resolution=512)
    assert [s.image_dir.name for s in group.datasets[0].subsets] == ["10_ok"]
    reasons = dict(group.skipped_dirs)
    assert "does not start with a repeat count" in reasons[str(tmp_path / "cats")]
    assert "repeat count 0 is less than 1" in reasons[str(tmp_path / "0_zero")]
    assert "repeat count -1 is less than 1" in reasons[str(tmp_path / "-1_neg")]
    assert len(record) == 1


def test_train_data_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetError, match=r"train_data_dir 'nope' does not exist .*<repeats>_<class"
    ):
        config_from_train_data_dir("nope", resolution=512, cwd=tmp_path)
    make_dirs(tmp_path / "flat", "cats")
    with pytest.raises(
        DatasetError, match=r"has no subfolders named <repeats>_<class tokens>.*'cats'"
    ):
        config_from_train_data_dir(tmp_path / "flat", resolution=512)
    make_dirs(tmp_path / "train", "1_a")
    with pytest.raises(DatasetError, match="reg_data_dir 'missing' does not exist"):
        config_from_train_data_dir("train", reg_data_dir="missing", resolution=512, cwd=tmp_path)
    with pytest.raises(ConfigError, match="resolution must be an integer or"):
        config_from_train_data_dir("train", resolution="big", cwd=tmp_path)


# --- fine-tuning metadata ------------------------------------------------------------------------


def test_load_metadata_json(tmp_path: Path) -> None:
    path = tmp_path / "meta.json"
    entries = {
        "img1": {"caption": "a cat", "tags": "cat, cute", "train_resolution": [512, 512]},
        "/abs/img2.png": {"tags": "dog", "image_size": [640, 480], "extra": 1},
    }
    path.write_text(json.dumps(entries), encoding="utf-8")
    assert load_metadata(path) == entries


def test_load_metadata_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "meta.jsonl"
    lines = [
        '{"image_path": "a.png", "caption": "one", "image_size": [64, 32]}',
        "",
        '{"image_path": "b.png", "caption": "two", "width": 10, "height": 20, "tags": "t"}',
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    assert load_metadata(path) == {
        "a.png": {"caption": "one", "image_size": [64, 32]},
        "b.png": {"caption": "two", "image_size": [10, 20], "tags": "t"},
    }


def test_load_metadata_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "meta.jsonl"
    path.write_text('{"image_path": "a.png"}\n{"image_path": "b.png",\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"meta.jsonl, line 2, column \d+: invalid JSON"):
        load_metadata(path)
    path.write_text('{"image_path": "a.png"}\n{"file": "b.png"}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r'meta.jsonl, line 2: missing "image_path"'):
        load_metadata(path)
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="line 1: each line must be a JSON object"):
        load_metadata(path)
    path.write_text('{"image_path": "a.png", "caption": 3}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="line 1: caption must be a string, got integer 3"):
        load_metadata(path)


def test_load_metadata_jsonl_repeated_image_keeps_the_last(tmp_path: Path) -> None:
    path = tmp_path / "meta.jsonl"
    path.write_text(
        '{"image_path": "a.png", "caption": "old"}\n{"image_path": "a.png", "caption": "new"}\n',
        encoding="utf-8",
    )
    with pytest.warns(StokerWarning, match=r"'a.png' \(lines 1 and 2\)"):
        assert load_metadata(path) == {"a.png": {"caption": "new"}}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[]", "metadata must be a JSON object"),
        ('{"a": "caption"}', "image 'a': an entry must be an object"),
        ('{"a": {"tags": ["x"]}}', "image 'a': tags must be a string, got array"),
        ('{"a": {"image_size": [512]}}', r"image_size must be \[width, height\]"),
        ('{"a": {"train_resolution": "512,512"}}', r"train_resolution must be \[width, height\]"),
        ('{"a": ', "line 1, column 7: invalid JSON"),
    ],
)
def test_load_metadata_json_errors(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "meta.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError, match=expected):
        load_metadata(path)


def test_load_metadata_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nope.json: file not found"):
        load_metadata(tmp_path / "nope.json")


def test_config_from_metadata(tmp_path: Path) -> None:
    make_dirs(tmp_path, "images")
    (tmp_path / "meta.json").write_text("{}", encoding="utf-8")
    group = config_from_metadata(
        "meta.json",
        image_dir="images",
        resolution=1024,
        cwd=tmp_path,
        caption_extension=".txt",  # fine-tuning ignores it, as sd-scripts does
        dataset_repeats=3,
    )
    subset = only_subset(group)
    assert subset.kind == "finetuning"
    assert (subset.metadata_file, subset.image_dir) == (tmp_path / "meta.json", tmp_path / "images")
    assert (subset.num_repeats, subset.caption_extension) == (3, ".caption")
    assert group.datasets[0].resolution == (1024, 1024)
    with pytest.raises(DatasetError, match="metadata_file 'gone.json' does not exist"):
        config_from_metadata("gone.json", resolution=512, cwd=tmp_path)
    with pytest.raises(DatasetError, match="image_dir 'none' does not exist"):
        config_from_metadata("meta.json", image_dir="none", resolution=512, cwd=tmp_path)


# --- the records themselves ----------------------------------------------------------------------


def test_records_normalise_and_validate_on_construction() -> None:
    subset = SubsetConfig(image_dir="imgs", caption_extension="txt", face_crop_aug_range=[1, 2])  # type: ignore[arg-type]
    assert subset.image_dir == Path("imgs")
    assert subset.caption_extension == ".txt"
    assert subset.face_crop_aug_range == (1.0, 2.0)
    with pytest.raises(ConfigError, match="a DreamBooth subset needs image_dir"):
        SubsetConfig()
    with pytest.raises(ConfigError, match="a fine-tuning subset needs metadata_file"):
        SubsetConfig(kind="finetuning")
    with pytest.raises(ConfigError, match="kind must be one of"):
        SubsetConfig(kind="lora", image_dir=Path("x"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="here: num_repeats = -1 is too small"):
        SubsetConfig(image_dir=Path("x"), num_repeats=-1, where="here")
    with pytest.raises(ConfigError, match="validation_split = 1 must be at least 0 and below 1"):
        DatasetConfig(subsets=(subset,), resolution=512, validation_split=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="subsets must be one or more SubsetConfig"):
        DatasetConfig(subsets=(), resolution=(512, 512))
    finetune = SubsetConfig(kind="finetuning", metadata_file=Path("m.json"))
    with pytest.raises(ConfigError, match="must share a kind"):
        DatasetConfig(subsets=(subset, finetune), resolution=(512, 512))
    with pytest.raises(ConfigError, match="no datasets"):
        DatasetGroupConfig(datasets=())


def test_records_are_frozen_picklable_and_read_only(tmp_path: Path) -> None:
    make_dirs(tmp_path, "a")
    text = (
        '[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "a"\n'
        "custom_attributes = { weight = 2, nested = { list = [1, 2] } }\n"
    )
    group = parse(tmp_path, text)
    subset = only_subset(group)
    assert pickle.loads(pickle.dumps(group)) == group
    assert subset.custom_attributes["nested"]["list"] == (1, 2)
    with pytest.raises(TypeError):
        subset.custom_attributes["weight"] = 3  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        subset.num_repeats = 3  # type: ignore[misc]
    assert hash(subset) == hash(dataclasses.replace(subset))
    assert dataclasses.replace(subset, num_repeats=4).num_repeats == 4


@pytest.mark.parametrize(
    ("dataset_lines", "message"),
    [
        (
            "resolution = 512\nmin_bucket_reso = 1024\nmax_bucket_reso = 512",
            r"train.toml, \[\[datasets\]\] #1: min_bucket_reso 1024 is larger than max_bucket_reso",
        ),
        ("resolution = 500", r"\[\[datasets\]\] #1: resolution = \[500, 500\]: each side .* 8"),
        ("resolution = [512, 300]", r"use \[512, 296\]"),
    ],
)
def test_bucket_and_resolution_errors_name_file_and_table(
    tmp_path: Path, dataset_lines: str, message: str
) -> None:
    make_dirs(tmp_path, "img")
    text = f"[[datasets]]\n{dataset_lines}\n[[datasets.subsets]]\nimage_dir = 'img'\n"
    with pytest.raises(ConfigError, match=message):
        parse(tmp_path, text)


def test_caption_keys_are_declared_once_in_caption_rules(tmp_path) -> None:
    # SubsetConfig extends CaptionRules: no caption key is declared (or defaulted) twice.
    from stoker.data.captions import CaptionRules

    caption_keys = {f.name for f in dataclasses.fields(CaptionRules)}
    assert issubclass(SubsetConfig, CaptionRules)
    assert not caption_keys & set(SubsetConfig.__annotations__)
    assert caption_keys <= {f.name for f in dataclasses.fields(SubsetConfig)}
    subset = SubsetConfig(image_dir=tmp_path, keep_tokens=2, caption_prefix="sks", flip_aug=True)
    assert subset.caption_rules() == CaptionRules(keep_tokens=2, caption_prefix="sks")
    assert type(subset.caption_rules()) is CaptionRules
    with pytest.raises(ConfigError, match=r"^where: caption_separator"):
        SubsetConfig(image_dir=tmp_path, caption_separator="", where="where")
