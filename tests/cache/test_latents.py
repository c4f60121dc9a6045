"""The latent cache with a real (tiny) diffusers VAE: exact encodings, loading, staleness, resume."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import stoker
from cache_models import tiny_vae, write_dataset
from conformance import _fingerprint, assert_deterministic_and_resumable
from stoker.cache.index import CacheIndex
from stoker.cache.latents import check_latent_cache, encoder_batches
from stoker.data.synthetic import write_image

pytest.importorskip("diffusers")


def build(folder, vae_dir, cache, **kwargs):
    dataset = stoker.load_dataset(folder.config)
    return dataset, stoker.cache_latents(dataset, vae_dir, cache_dir=cache, workers=0, **kwargs)


def test_entries_are_the_encodings_of_what_the_dataset_loads(folder, vae_dir, tmp_path):
    dataset, report = build(folder, vae_dir, tmp_path / "cache")
    assert (report.valid, report.stale, report.missing, report.encoded) == (7, 0, 0, 7)
    vae = tiny_vae()  # the same random weights as the saved folder
    cached = stoker.load_dataset(folder.config, latent_cache=tmp_path / "cache")
    for image in range(len(dataset)):
        pixels = torch.from_numpy(dataset.view_pixels(image)).permute(2, 0, 1)[None]
        x = pixels.float() / 127.5 - 1
        with torch.no_grad():
            plain = vae.encode(x).latent_dist
            mirror = vae.encode(x.flip(-1)).latent_dist
        for flipped, dist in ((False, plain), (True, mirror)):
            mean, logvar = cached.latents.distribution(image, flipped)
            assert mean.dtype == torch.bfloat16
            torch.testing.assert_close(mean.float(), dist.mean[0], atol=2e-2, rtol=1e-2)
            torch.testing.assert_close(logvar.float(), dist.logvar[0], atol=5e-2, rtol=1e-2)
        bucket_w, bucket_h = dataset.bucket_wh[image]
        assert mean.shape == (4, bucket_h // 8, bucket_w // 8)


def test_batches_carry_latents_and_every_other_key_as_from_images(folder, vae_dir, tmp_path):
    build(folder, vae_dir, tmp_path / "cache")
    images = stoker.make_loader(
        stoker.load_dataset(folder.config), shuffle=True, seed=3, workers=0, monitor=False
    )
    cached_ds = stoker.load_dataset(folder.config, latent_cache=tmp_path / "cache")
    cached = stoker.make_loader(cached_ds, shuffle=True, seed=3, workers=0, monitor=False)
    pairs = list(zip(images, cached, strict=True))
    assert len(pairs) > 3
    for a, b in pairs:
        assert "images" not in b and "latents" in b
        assert set(a) - {"images"} == set(b) - {"latents"}
        for key in set(a) - {"images"}:
            assert _fingerprint(a[key]) == _fingerprint(b[key]), key
        n, _, h, w = a["images"].shape
        assert b["latents"].shape == (n, 4, h // 8, w // 8)
        assert b["latents"].dtype == torch.float32


def test_latents_are_fresh_samples_keyed_like_everything_else(folder, vae_dir, tmp_path):
    build(folder, vae_dir, tmp_path / "cache")
    dataset = stoker.load_dataset(folder.config, latent_cache=tmp_path / "cache")
    first = dataset[(0, 0, 0, 0)]["latents"]
    assert torch.equal(first, dataset[(0, 0, 0, 0)]["latents"])  # same key, same sample
    other_epoch = dataset[(1, 0, 0, 0)]["latents"]
    assert not torch.equal(first, other_epoch)  # a new draw each epoch, not one frozen sample
    mean, _ = dataset.latents.distribution(0, dataset[(0, 0, 0, 0)]["flippeds"][0])
    assert (first[0] - mean.float()).abs().max() > 0

    def make(seed, workers):
        return stoker.make_loader(dataset, shuffle=True, seed=seed, workers=workers, monitor=False)

    assert_deterministic_and_resumable(make, seed=7, midpoint=5)


def test_no_image_is_opened_when_training_from_the_cache(folder, vae_dir, tmp_path, monkeypatch):
    build(folder, vae_dir, tmp_path / "cache")
    dataset = stoker.load_dataset(folder.config, latent_cache=tmp_path / "cache")
    # Destroy every image after loading: any decode would fail (and be reported as replaced).
    for path in folder.images:
        path.write_bytes(b"")
    import stoker.data.dataset as dataset_module

    def refuse(*args, **kwargs):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(dataset_module, "open_image", refuse)
    for workers in (0, 2):
        loader = stoker.make_loader(dataset, shuffle=True, seed=1, workers=workers, monitor=False)
        batches = list(loader)
        assert batches and all(b["replaced"] == [] for b in batches)
        assert sum(len(b["captions"]) for b in batches) == dataset.report.samples_per_epoch


def test_stale_entries_are_found_and_never_served(folder, vae_dir, tmp_path):
    cache = tmp_path / "cache"
    build(folder, vae_dir, cache)
    edited = folder.images[2]
    stat = edited.stat()
    write_image(edited, 240, 320, np.random.default_rng(99))  # same size, new pixels
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(stoker.CacheError) as err:
        stoker.load_dataset(folder.config, latent_cache=cache)
    message = str(err.value)
    assert "6 valid, 1 stale, 0 missing" in message and str(edited) in message
    assert "stoker cache" in message
    dataset, report = build(folder, vae_dir, cache)
    assert (report.encoded, report.valid) == (1, 7)


def test_touched_but_unchanged_files_stay_valid(folder, vae_dir, tmp_path):
    cache = tmp_path / "cache"
    build(folder, vae_dir, cache)
    for path in folder.images:
        os.utime(path, ns=(1, 10**18))
    report = check_latent_cache(stoker.load_dataset(folder.config), cache).report
    assert (report.valid, report.stale) == (7, 0)


@pytest.mark.parametrize(
    "change",
    ["vae", "dtype", "resolution", "flip_aug"],
)
def test_recipe_changes_make_every_entry_stale(folder, vae_dir, tmp_path, change):
    cache = tmp_path / "cache"
    build(folder, vae_dir, cache)
    dataset = stoker.load_dataset(folder.config)
    if change == "vae":
        report = stoker.cache_latents(dataset, tiny_vae(seed=1), cache_dir=cache, workers=0)
    elif change == "dtype":
        report = stoker.cache_latents(dataset, vae_dir, cache_dir=cache, dtype="fp32", workers=0)
    else:
        if change == "flip_aug":
            write_dataset(folder.root, flip=False)
        else:
            text = folder.config.read_text()
            folder.config.write_text(text.replace("resolution = 128", "resolution = 192"))
        changed = stoker.load_dataset(folder.config)
        assert check_latent_cache(changed, cache).report.stale == 7
        report = stoker.cache_latents(changed, vae_dir, cache_dir=cache, workers=0)
    assert report.encoded == 7 and report.valid == 7


def test_random_crop_and_color_aug_are_refused_with_the_reason(tmp_path, vae_dir):
    for key in ("random_crop", "color_aug"):
        folder = write_dataset(tmp_path / key, extra=f"{key} = true")
        dataset = stoker.load_dataset(folder.config)
        with pytest.raises(stoker.CacheError, match=f"{key} .*turn {key} off|{key}"):
            stoker.cache_latents(dataset, vae_dir, cache_dir=tmp_path / "c")
        with pytest.raises(stoker.CacheError, match=key):
            stoker.load_dataset(folder.config, latent_cache=tmp_path / "c")


class FailingVae(torch.nn.Module):
    """Wraps a VAE; counts encoded images and raises after ``fail_after`` encoder calls."""

    def __init__(self, vae, fail_after=None):
        super().__init__()
        self.vae = vae
        self.fail_after = fail_after
        self.images = 0
        self.calls = 0

    @property
    def config(self):
        return self.vae.config

    def encode(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.images += x.shape[0]
        return self.vae.encode(x)


def test_an_interrupted_build_resumes_without_encoding_anything_twice(folder, tmp_path):
    cache = tmp_path / "cache"
    dataset = stoker.load_dataset(folder.config)
    first = FailingVae(tiny_vae(), fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        stoker.cache_latents(dataset, first, cache_dir=cache, batch_size=2, workers=0)
    # Interrupted before the index was written: the shards alone say what is done.
    assert not (cache / "latents-index.npz").exists()
    done = check_latent_cache(dataset, cache, encoder=None).report
    second = FailingVae(tiny_vae())
    report = stoker.cache_latents(dataset, second, cache_dir=cache, batch_size=2, workers=0)
    assert report.valid == 7 and report.encoded == 7 - first.images // 2
    # Each image is encoded once in all (mirror views ride in the same call).
    assert (first.images + second.images) // 2 == 7
    assert done.valid == first.images // 2 or done.valid == 0  # another digest before the index


def test_shards_are_plain_safetensors(folder, vae_dir, tmp_path):
    safetensors = pytest.importorskip("safetensors")
    cache = tmp_path / "cache"
    build(folder, vae_dir, cache)
    shards = sorted(cache.glob("latents-*.safetensors"))
    assert shards
    dataset = stoker.load_dataset(folder.config, latent_cache=cache)
    with safetensors.safe_open(str(shards[0]), framework="pt") as handle:
        names = list(handle.keys())
        assert len(names) == 7 and "stoker" in handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in names}
    stored = {tuple(t[0, 0].float().flatten()[:8].tolist()) for t in tensors.values()}
    for image in range(len(dataset)):
        mean, _ = dataset.latents.distribution(image, False)
        assert tuple(mean.float().flatten()[:8].tolist()) in stored


def test_a_cut_shard_names_itself_and_the_fix(folder, vae_dir, tmp_path):
    cache = tmp_path / "cache"
    build(folder, vae_dir, cache)
    (cache / "latents-index.npz").unlink()
    shard = next(cache.glob("latents-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(stoker.CacheError, match=f"{shard.name}.*stoker cache"):
        stoker.load_dataset(folder.config, latent_cache=cache)


def test_an_index_checks_a_whole_dataset_at_once():
    rng = np.random.default_rng(0)
    index = CacheIndex(Path("/nonexistent"), "latents")
    n = 100_000
    keys = rng.integers(0, 2**63, size=(n, 2), dtype=np.int64).astype(np.uint64)
    slots = rng.integers(0, 2**63, size=(n, 2), dtype=np.int64).astype(np.uint64)
    index.columns.update(
        key=keys,
        recipe_slot=slots,
        slot=slots,
        content=keys,
        shard=np.zeros(n, np.int32),
        entry=np.arange(n, dtype=np.int32),
    )
    index._sort()
    wanted = keys.copy()
    wanted[:10, 1] ^= np.uint64(1)  # changed files: same slot, new key
    wanted_slots = slots.copy()
    wanted_slots[:5] ^= np.uint64(3)  # and five never seen
    status, rows = index.classify(wanted, wanted_slots, wanted_slots)
    assert np.bincount(status, minlength=3).tolist() == [n - 10, 5, 5]
    assert np.array_equal(index.columns["key"][rows[10:]], wanted[10:])


def test_encoder_batches_are_disjoint_per_bucket_shares():
    groups = np.array([0, 1, 0, 1, 0, 2, 0, 1, 2, 0])
    todo = np.arange(10)
    shares = [encoder_batches(groups, todo, 2, rank, 3) for rank in range(3)]
    flat = [i for share in shares for batch in share for i in batch]
    assert sorted(flat) == list(range(10))
    for share in shares:
        for batch in share:
            assert len({int(groups[i]) for i in batch}) == 1
