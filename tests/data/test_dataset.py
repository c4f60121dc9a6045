from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

import stoker
from conformance import assert_deterministic_and_resumable
from image_formats import FORMAT_NAMES
from stoker import DatasetError, StokerWarning, load_dataset, make_loader
from stoker.data.synthetic import write_image, write_sample_dataset


def batches_of(loader, count=None):
    out = []
    for i, batch in enumerate(loader):
        if count is not None and i >= count:
            break
        out.append(batch)
    return out


@pytest.fixture
def sample(tmp_path):
    return write_sample_dataset(tmp_path / "sample", images=16, seed=1)


def test_train_data_dir_with_reg_balancing(sample):
    ds = load_dataset(
        sample.train_data_dir, reg_data_dir=sample.root / "reg", resolution=256, enable_bucket=True
    )
    report = ds.report
    train = [s for s in report.subsets if not s.is_reg]
    reg = [s for s in report.subsets if s.is_reg]
    assert [s.images for s in train] == [12] and [s.num_repeats for s in train] == [10]
    assert train[0].samples_per_epoch == 120
    # sd-scripts repeats regularisation images until they match the training samples
    assert reg[0].images == 4 and reg[0].samples_per_epoch == 120
    assert report.samples_per_epoch == 240
    assert report.problems == ()


def test_config_batches_follow_sd_scripts_keys(sample):
    ds = load_dataset(sample.config)
    loader = make_loader(ds, seed=0, workers=0, budget=1)
    batch = next(iter(loader))
    keys = {
        "images",
        "captions",
        "loss_weights",
        "original_sizes_hw",
        "crop_top_lefts",
        "target_sizes_hw",
        "flippeds",
        "network_multipliers",
        "custom_attributes",
        "image_keys",
    }
    assert keys <= set(batch)
    images = batch["images"]
    assert images.dtype == torch.float32 and images.ndim == 4 and images.shape[1] == 3
    assert images.min() >= -1 and images.max() <= 1
    h, w = images.shape[2:]
    assert batch["target_sizes_hw"].tolist() == [[h, w]] * len(images)
    assert len(batch["captions"]) == len(images) <= 2


def test_a_batch_never_mixes_buckets_or_datasets(tmp_path):
    rng = np.random.default_rng(0)
    for folder, shapes in (("a", [(512, 512), (768, 384)]), ("b", [(384, 768), (512, 512)])):
        (tmp_path / folder).mkdir()
        for i in range(6):
            w, h = shapes[i % 2]
            write_image(tmp_path / folder / f"{i}.jpg", w, h, rng)
    config = tmp_path / "two.toml"
    config.write_text(
        "[general]\nenable_bucket = true\ncaption_extension = '.txt'\n"
        "[[datasets]]\nresolution = 512\nbatch_size = 2\n"
        "  [[datasets.subsets]]\n  image_dir = 'a'\n  class_tokens = 'a'\n"
        "[[datasets]]\nresolution = 512\nbatch_size = 3\n"
        "  [[datasets.subsets]]\n  image_dir = 'b'\n  class_tokens = 'b'\n"
    )
    ds = load_dataset(config)
    seen = {"a": 0, "b": 0}
    for batch in make_loader(ds, seed=3, shuffle=True, workers=0, budget=1):
        sizes = {tuple(s) for s in batch["target_sizes_hw"].tolist()}
        tokens = {c.split(",")[0] for c in batch["captions"]}
        assert len(sizes) == 1 and len(tokens) == 1
        (token,) = tokens
        # each bucket holds 3 images: batches of 2 leave a last batch of 1, as in sd-scripts
        assert len(batch["captions"]) <= (2 if token == "a" else 3)
        seen[token] += len(batch["captions"])
    assert seen == {"a": 6, "b": 6}


def test_every_format_loads_with_exif_orientation(messy):
    ds = load_dataset(
        messy.train,
        resolution=128,
        on_error="skip",
        enable_bucket=True,
        min_bucket_reso=64,
        bucket_reso_steps=32,
    )
    paths = [ds.catalog.paths[i] for i in range(len(ds))]
    names = {p.rsplit("/", 1)[1] for p in paths}
    for name in FORMAT_NAMES:
        assert name in names
    rotated = paths.index(next(p for p in paths if p.endswith("rotated.jpg")))
    assert (ds.catalog.widths[rotated], ds.catalog.heights[rotated]) == (200, 320)
    for i in range(len(ds)):
        if not ds.catalog.paths[i].endswith("truncated.jpg"):
            sample = ds[i]
            assert sample["images"].shape[1] == 3


def test_bad_files_are_listed_and_skipped(messy):
    with pytest.warns(StokerWarning, match=r"stoker skipped \d+ files"):
        ds = load_dataset(
            messy.train,
            resolution=128,
            enable_bucket=True,
            min_bucket_reso=64,
            bucket_reso_steps=32,
        )
    problems = {p.path.rsplit("/", 1)[1]: p for p in ds.report.problems}
    for name, fragment in messy.bad_names.items():
        assert name in problems, name
        assert fragment in problems[name].reason
    assert problems["zero.jpg"].action == "skipped"
    assert problems["latin1.caption"].action == "used class tokens"
    kept = {ds.catalog.paths[i].rsplit("/", 1)[1] for i in range(len(ds))}
    assert "latin1.jpg" in kept and "zero.jpg" not in kept and "tiny.jpg" not in kept


def test_on_error_raise_lists_every_problem(messy):
    with pytest.raises(DatasetError) as err:
        load_dataset(
            messy.train,
            resolution=128,
            on_error="raise",
            enable_bucket=True,
            min_bucket_reso=64,
            bucket_reso_steps=32,
        )
    text = str(err.value)
    for name in messy.bad_names:
        assert name in text


@pytest.mark.slow
def test_decode_failure_in_a_worker_is_replaced_and_reported(messy):
    ds = load_dataset(messy.train, resolution=128, on_error="skip", batch_size=1)
    loader = make_loader(ds, seed=0, shuffle=False, workers=2, budget=2, persistent=False)
    with pytest.warns(StokerWarning, match=r"could not decode .*truncated\.jpg"):
        batches = batches_of(loader)
    assert len(batches) == len(loader)
    (problem,) = [p for p in ds.decode_problems if p.path.endswith("truncated.jpg")]
    assert problem.stage == "decode" and problem.action == "replaced"
    assert problem.kind == "decode_failed" and problem in ds.report.problems
    keys = [b["image_keys"][0] for b in batches]
    assert not any(k.endswith("truncated.jpg") for k in keys)


def test_missing_folder_and_empty_dataset_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nowhere", resolution=512)
    (tmp_path / "train" / "5_cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no usable images"):
        load_dataset(tmp_path / "train", resolution=512)


def test_validation_split_partitions_the_images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "train" / "1_cat"
    folder.mkdir(parents=True)
    for i in range(20):
        write_image(folder / f"{i:02d}.jpg", 256, 256, rng)
    train = load_dataset(tmp_path / "train", resolution=256, validation_split=0.25)
    val = load_dataset(tmp_path / "train", resolution=256, validation_split=0.25, validation=True)
    a = {train.catalog.paths[i] for i in range(len(train))}
    b = {val.catalog.paths[i] for i in range(len(val))}
    assert len(a) == 15 and len(b) == 5 and not a & b


def test_scan_cache_follows_file_changes(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        write_image(folder / f"{i}.jpg", 320, 256, rng)
    config = tmp_path / "c.toml"
    config.write_text(
        "[[datasets]]\nresolution = 256\n[[datasets.subsets]]\nimage_dir = 'imgs'\n"
        "cache_info = true\nclass_tokens = 'x'\n"
    )
    first = load_dataset(config)
    assert (folder / ".stoker-scan-cache.json").exists()
    assert first.catalog.widths.tolist() == [320] * 3
    write_image(folder / "1.jpg", 256, 400, rng)  # new size and mtime: the entry is stale
    second = load_dataset(config)
    assert second.catalog.widths.tolist() == [320, 256, 320]
    assert second.catalog.heights.tolist() == [256, 400, 256]


def test_dataset_pickles_small(tmp_path):
    sample = write_sample_dataset(tmp_path / "s", images=40)
    ds = load_dataset(sample.config)
    blob = pickle.dumps(ds)
    per_image = len(blob) / len(ds)
    assert per_image < 400, per_image  # arrays and packed strings, not an object per image
    again = pickle.loads(blob)
    assert torch.equal(again[0]["images"], ds[0]["images"])


def test_uint8_output_and_conversion(sample):
    ds = load_dataset(sample.config, output="uint8")
    fl = load_dataset(sample.config)
    raw = ds[0]["images"]
    assert raw.dtype == torch.uint8
    assert torch.allclose(stoker.to_float_images(raw), fl[0]["images"])


def test_alpha_mask_batches(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "img"
    folder.mkdir()
    from PIL import Image

    rgba = np.dstack(
        [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), np.full((256, 256), 51, np.uint8)]
    )
    Image.fromarray(rgba, "RGBA").save(folder / "a.png")
    config = tmp_path / "c.toml"
    config.write_text(
        "[[datasets]]\nresolution = 256\n[[datasets.subsets]]\nimage_dir = 'img'\n"
        "alpha_mask = true\nclass_tokens = 'x'\n"
    )
    batch = load_dataset(config)[0]
    assert batch["alpha_masks"].shape == (1, 256, 256)
    assert torch.allclose(batch["alpha_masks"], torch.full((1, 256, 256), 0.2))


def samples_with(ds, workers, start_method=None, epochs=2):
    loader = make_loader(
        ds,
        seed=11,
        shuffle=True,
        workers=workers,
        budget=2,
        start_method=start_method,
        persistent=False if workers else None,
    )
    out = []
    for _ in range(epochs):
        out += [(b["images"], b["captions"], b["flippeds"], b["image_keys"]) for b in loader]
    return out


@pytest.fixture
def augmented(tmp_path):
    """A sample dataset with every random choice switched on."""
    sample = write_sample_dataset(tmp_path / "s", images=12)
    text = sample.config.read_text().replace(
        "shuffle_caption = true",
        "shuffle_caption = true\nflip_aug = true\nrandom_crop = true\ncolor_aug = true\n"
        "caption_tag_dropout_rate = 0.3\ncaption_dropout_rate = 0.1",
    )
    sample.config.write_text(text)
    return load_dataset(sample.config)


def _augmented_source(sample, kind: str, tmp_path):
    """The sample's images as one of the three sources sd-scripts reads, every random choice on."""
    options = {"flip_aug": True, "random_crop": True, "color_aug": True}
    if kind == "toml":
        return load_dataset(sample.config)
    if kind == "folders":
        return load_dataset(sample.train_data_dir, reg_data_dir=sample.root / "reg", resolution=256)
    images = sorted((sample.train_data_dir).rglob("*.jpg"))
    metadata = {
        p.stem: {"caption": f"photo of sks dog, number {i}, outdoors"} for i, p in enumerate(images)
    }
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(metadata))
    config = tmp_path / "meta.toml"
    config.write_text(
        "[general]\nenable_bucket = true\nshuffle_caption = true\n"
        + "".join(f"{k} = true\n" for k in options)
        + f"[[datasets]]\nresolution = 256\nbatch_size = 2\n[[datasets.subsets]]\n"
        f"metadata_file = '{meta}'\nimage_dir = '{images[0].parent}'\nnum_repeats = 2\n"
    )
    return load_dataset(config)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["toml", "folders", "metadata"])
def test_every_source_conforms_deterministic_and_resumable(kind, augmented, tmp_path):
    """The conformance helper on each way of describing a dataset: sd-scripts' TOML config, its
    N_name folders, and fine-tuning metadata."""
    if kind == "toml":
        dataset = augmented
    else:
        sample = write_sample_dataset(tmp_path / "source", images=10)
        dataset = _augmented_source(sample, kind, tmp_path)

    def build(*, seed, workers):
        return make_loader(
            dataset,
            seed=seed,
            shuffle=True,
            workers=workers,
            budget=2,
            persistent=False if workers else None,
        )

    # The TOML source runs 0, 1 and 2 workers; the others 0 and 2 (the same paths, half the time).
    workers = (0, 1, 2) if kind == "toml" else (0, 2)
    assert_deterministic_and_resumable(build, seed=11, midpoint=5, workers=workers)


class _SamplerOnly:
    """The batch sampler alone, as a loader: what it yields is the batch (its sample keys)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        for batch in self.sampler:
            self.sampler.mark_consumed()
            yield [tuple(int(k) for k in key) for key in batch]

    def __len__(self):
        return len(self.sampler)

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state)


def test_the_sampler_alone_conforms(augmented):
    def build(*, seed, workers):  # no workers: the sampler runs in this process
        return _SamplerOnly(augmented.make_batch_sampler(seed=seed, shuffle=True))

    assert_deterministic_and_resumable(build, seed=3, midpoint=9, workers=(0,), epochs=3)


@pytest.mark.slow
def test_spawn_gives_the_same_batches_as_fork(augmented):
    reference = samples_with(augmented, 2, "fork", epochs=1)
    got = samples_with(augmented, 2, "spawn", epochs=1)
    for (ia, ca, fa, ka), (ib, cb, fb, kb) in zip(reference, got, strict=True):
        assert torch.equal(ia, ib) and ca == cb and fa == fb and ka == kb


def test_fine_tuning_metadata_source(tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "imgs"
    images.mkdir()
    for name, (w, h) in {"a": (512, 512), "b": (640, 384)}.items():
        write_image(images / f"{name}.jpg", w, h, rng)
    meta = tmp_path / "meta.json"
    meta.write_text('{"a": {"caption": "a cat", "tags": "cute, fluffy"}, "b": {"tags": "dog"}}')
    ds = load_dataset(meta, image_dir=images, resolution=512, enable_bucket=True)
    by_key = {ds.catalog.paths[i].rsplit("/", 1)[1]: ds.catalog.captions[i] for i in range(2)}
    assert by_key == {"a.jpg": "a cat, cute, fluffy", "b.jpg": "dog"}
    assert ds[0]["captions"][0] in ("a cat, cute, fluffy", "dog")


def test_conditioning_images_are_cropped_with_their_image(tmp_path):
    rng = np.random.default_rng(0)
    images, cond = tmp_path / "img", tmp_path / "cond"
    images.mkdir()
    cond.mkdir()
    for i in range(3):
        write_image(images / f"{i}.jpg", 640, 384, rng)
        (images / f"{i}.caption").write_text("a photo")
    for i in range(3):
        # the conditioning image is the image itself: after the same crop they must agree
        (cond / f"{i}.jpg").write_bytes((images / f"{i}.jpg").read_bytes())
    config = tmp_path / "c.toml"
    config.write_text(
        "[general]\nenable_bucket = true\n[[datasets]]\nresolution = 512\n"
        "batch_size = 3\n[[datasets.subsets]]\nimage_dir = 'img'\n"
        "conditioning_data_dir = 'cond'\nflip_aug = true\ncaption_extension = "
        "'.caption'\n"
    )
    ds = load_dataset(config)
    batch = next(iter(make_loader(ds, seed=5, shuffle=True, workers=0, budget=1)))
    assert batch["conditioning_images"].shape == batch["images"].shape
    assert torch.equal(batch["conditioning_images"], batch["images"])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_four_workers_match_in_process_loading(tmp_path):
    sample = write_sample_dataset(tmp_path / "s", images=8)
    ds = load_dataset(sample.config)
    reference = samples_with(ds, 0, epochs=1)
    loader = make_loader(ds, seed=11, shuffle=True, workers=4, budget=4, persistent=False)
    got = [(b["images"], b["captions"], b["flippeds"], b["image_keys"]) for b in loader]
    assert len(got) == len(reference)
    for (ia, ca, fa, ka), (ib, cb, fb, kb) in zip(reference, got, strict=True):
        assert torch.equal(ia, ib) and ca == cb and fa == fb and ka == kb


def test_make_loader_says_when_batch_size_comes_from_the_config(sample):
    ds = load_dataset(sample.config)  # batch_size = 2 in the sample config
    with pytest.warns(StokerWarning, match=r"batch_size from 4 to 2: a stoker dataset batches"):
        loader = make_loader(ds, batch_size=4, workers=0, budget=1, seed=0)
    assert len(next(iter(loader))["captions"]) <= 2
    # an override sits below the config, as sd-scripts' --train_batch_size does
    again = load_dataset(sample.config, batch_size=4)
    assert max(len(b["captions"]) for b in make_loader(again, workers=0, budget=1, seed=0)) == 2


def test_a_file_name_that_is_not_utf8_still_loads(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "train" / "2_cat"
    folder.mkdir(parents=True)
    write_image(folder / "ok.jpg", 256, 256, rng)
    odd = bytes(folder) + b"/bad\xff name.jpg"  # a Latin-1 name from an old archive
    write_image(folder / "tmp.jpg", 256, 256, rng)
    import os

    os.rename(bytes(folder / "tmp.jpg"), odd)
    ds = load_dataset(tmp_path / "train", resolution=256)
    assert len(ds) == 2
    keys = {k for i in range(2) for k in ds[i]["image_keys"]}
    assert any("bad" in k for k in keys)


def test_validation_split_keeps_regularisation_images_in_training(sample):
    train = load_dataset(
        sample.train_data_dir,
        reg_data_dir=sample.root / "reg",
        resolution=256,
        validation_split=0.5,
    )
    val = load_dataset(
        sample.train_data_dir,
        reg_data_dir=sample.root / "reg",
        resolution=256,
        validation_split=0.5,
        validation=True,
    )
    reg_train = [s.images for s in train.report.subsets if s.is_reg]
    reg_val = [s.images for s in val.report.subsets if s.is_reg]
    assert reg_train == [4] and reg_val == [0]
    assert [s.images for s in val.report.subsets if not s.is_reg] == [6]


def test_nothing_to_train_on_is_an_error(sample):
    config = sample.root / "only_reg.toml"
    config.write_text(
        "[[datasets]]\nresolution = 256\n[[datasets.subsets]]\n"
        "image_dir = 'reg/1_dog'\nis_reg = true\nclass_tokens = 'dog'\n"
    )
    with pytest.raises(DatasetError, match="only regularisation subsets"):
        load_dataset(config)
    zero = sample.root / "zero.toml"
    zero.write_text(
        "[[datasets]]\nresolution = 256\n[[datasets.subsets]]\n"
        "image_dir = 'train/10_sks dog'\nnum_repeats = 0\nclass_tokens = 'dog'\n"
    )
    with pytest.raises(DatasetError, match="every training subset has num_repeats = 0"):
        load_dataset(zero)
    # An empty training folder next to a reg folder: the images are missing, not the repeats.
    (sample.root / "empty").mkdir()
    empty = sample.root / "empty.toml"
    empty.write_text(
        "[[datasets]]\nresolution = 256\n[[datasets.subsets]]\nimage_dir = 'empty'\n"
        "num_repeats = 10\n[[datasets.subsets]]\nimage_dir = 'reg/1_dog'\nis_reg = true\n"
    )
    with pytest.raises(DatasetError, match=r"the training subsets have no usable images \("):
        load_dataset(empty)


def test_validation_without_a_split_is_a_clear_error(sample):
    with pytest.raises(DatasetError, match="no dataset sets validation_split"):
        load_dataset(sample.config, validation=True)


def test_missing_captions_are_counted_per_subset_from_data(tmp_path):
    # A subset folder whose name is a prefix of its sibling's (dog, dog2) once counted both. Bare
    # repeat counts (no class tokens), so a missing caption is a reported problem.
    rng = np.random.default_rng(0)
    for name in ("1", "12"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(2):
            write_image(tmp_path / "train" / name / f"{i}.jpg", 256, 256, rng)
    ds = load_dataset(tmp_path / "train", resolution=256, on_error="skip")
    assert {s.folder.rsplit("/", 1)[1]: s.missing_captions for s in ds.report.subsets} == {
        "1": 2,
        "12": 2,
    }
    kinds = {(p.kind, ds.catalog.subsets[p.subset].where) for p in ds.report.problems}
    assert len(kinds) == 2 and {k for k, _ in kinds} == {"missing_caption"}
