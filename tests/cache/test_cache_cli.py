"""``stoker cache`` and ``stoker scan``'s cache report, and a real two-rank torchrun build."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import launch
import stoker
from stoker.cache.index import CacheIndex
from stoker.cli import main
from stoker.data.synthetic import write_image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


def _encoders(folder, vae_dir, clip_dirs, cache) -> list[str]:
    """`stoker cache`'s source, models and folder, as both commands below give them."""
    return [
        str(folder.config),
        "--vae",
        str(vae_dir),
        "--text-encoder",
        str(clip_dirs[0]),
        "--tokenizer",
        str(clip_dirs[1]),
        "--cache-dir",
        str(cache),
    ]


def test_cache_command_builds_both_caches_and_scan_reports_them(
    folder, vae_dir, clip_dirs, tmp_path, capsys
):
    cache = tmp_path / "cache"
    args = ["cache", *_encoders(folder, vae_dir, clip_dirs, cache)]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"latents cache {cache}: 7 valid, 0 stale, 0 missing; encoded 7")
    assert out[1].startswith(f"text cache {cache}: 7 valid, 0 stale, 0 missing; encoded 4")
    assert main([*args, "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [r["encoded"] for r in reports] == [0, 0]
    write_image(folder.images[0], 256, 256, np.random.default_rng(5))  # edited, same size
    os.utime(folder.images[0], ns=(1, folder.images[0].stat().st_mtime_ns + 10**9))
    scan = ["scan", str(folder.config), "--latent-cache", str(cache), "--text-cache", str(cache)]
    assert main(scan) == 0
    out = capsys.readouterr().out
    assert "latents cache" in out and "6 valid, 1 stale, 0 missing (run stoker cache" in out
    assert "text cache" in out and "7 valid, 0 stale, 0 missing (ready)" in out


def test_cache_command_without_a_folder_says_how_to_give_one(folder, vae_dir, capsys):
    assert main(["cache", str(folder.config), "--vae", str(vae_dir)]) == 2
    assert "--cache-dir" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.torchrun
def test_torchrun_two_ranks_encode_disjoint_shares_into_one_index(
    folder, vae_dir, clip_dirs, tmp_path
):
    cache = tmp_path / "cache"
    env = launch.launch_env()
    arguments = [
        "-m",
        "stoker.cli",
        "cache",
        *_encoders(folder, vae_dir, clip_dirs, cache),
        "--encode-batch-size",
        "1",
        "--json",
    ]
    launch.run([*launch.launcher(2), *arguments], env=env, check=True)
    for kind, entries in (("latents", 7), ("text", 4)):
        shards = sorted(p.name for p in cache.glob(f"{kind}-r*.safetensors"))
        assert {name.split("-")[1] for name in shards} == {"r0", "r1"}  # both ranks wrote
        index = CacheIndex.load(cache, kind)
        # One index for both ranks, each entry encoded once.
        distinct = {
            int(s) * 10**6 + int(e)
            for s, e in zip(index.columns["shard"], index.columns["entry"], strict=True)
        }
        assert len(distinct) == entries
    dataset = stoker.load_dataset(folder.config, latent_cache=cache, text_cache=cache)
    assert "latents" in dataset[0] and "text_hidden_states" in dataset[0]
    # A second run finds everything valid: neither rank writes a shard.
    before = sorted(p.name for p in cache.glob("*.safetensors"))
    launch.run([*launch.launcher(2), *arguments], env=env, check=True)  # a fresh port
    assert sorted(p.name for p in cache.glob("*.safetensors")) == before
