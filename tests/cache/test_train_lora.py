"""examples/train_lora.py runs: caches, then trains a LoRA from them, in one process and on two."""

from __future__ import annotations

from pathlib import Path

import pytest

import launch

pytest.importorskip("peft")
pytest.importorskip("accelerate")
diffusers = pytest.importorskip("diffusers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_lora.py"


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,  # the tiny CLIP's width
        attention_head_dim=4,
        norm_num_groups=8,
    )
    folder = tmp_path_factory.mktemp("unet")
    unet.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_train_lora_example_caches_then_trains(
    folder, vae_dir, clip_dirs, unet_dir, tmp_path, processes
):
    out = tmp_path / "lora.safetensors"
    args = [
        str(EXAMPLE),
        str(folder.config),
        "--vae",
        str(vae_dir),
        "--text-encoder",
        str(clip_dirs[0]),
        "--tokenizer",
        str(clip_dirs[1]),
        "--unet",
        str(unet_dir),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--steps",
        "3",
        "--out",
        str(out),
    ]
    done = launch.run([*launch.launcher(processes), *args], env=launch.launch_env(), check=True)
    steps = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 3
    assert out.exists()
    from safetensors.torch import load_file

    assert any("lora" in name for name in load_file(out))
    shards = {p.name.split("-")[1] for p in (tmp_path / "cache").glob("latents-*.safetensors")}
    assert shards == {f"r{r}" for r in range(processes)}
