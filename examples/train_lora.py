"""Train a LoRA on a UNet from stoker's caches: encode once, then train without decoding an image.

    accelerate launch examples/train_lora.py train.toml --vae VAE --text-encoder TE \
        --tokenizer TOK --unet UNET --cache-dir cache --steps 1000
    torchrun --nproc_per_node=2 examples/train_lora.py ...      # the same, on two processes

Every rank encodes its share of what the cache lacks (stoker.cache_latents and
stoker.cache_text_encoder_outputs), then trains from the cache: ``stoker.make_loader`` shards whole
bucket batches by rank itself, so the loader is not passed to ``accelerator.prepare``. Copy it and
change the model, the loss and the schedule to your needs; this is the plain SD 1.x epsilon loss.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

import stoker


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="sd-scripts dataset config (.toml)")
    parser.add_argument("--vae", required=True, help="AutoencoderKL folder")
    parser.add_argument("--text-encoder", required=True, help="CLIPTextModel folder")
    parser.add_argument("--tokenizer", required=True, help="CLIPTokenizer folder")
    parser.add_argument("--unet", required=True, help="UNet2DConditionModel folder")
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--out", default="lora.safetensors")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args()


def main() -> None:
    args = parse()
    # Under torchrun or `accelerate launch` this starts the process group the cache builds use;
    # without a GPU, accelerate runs several processes only when told cpu=True.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    dataset = stoker.load_dataset(args.config, seed=args.seed)
    stoker.cache_latents(dataset, args.vae, cache_dir=args.cache_dir, device=accelerator.device)
    stoker.cache_text_encoder_outputs(
        dataset,
        args.text_encoder,
        args.tokenizer,
        cache_dir=args.cache_dir,
        device=accelerator.device,
    )
    cached = stoker.load_dataset(
        args.config, seed=args.seed, latent_cache=args.cache_dir, text_cache=args.cache_dir
    )
    loader = stoker.make_loader(cached, shuffle=True, seed=args.seed)

    unet = UNet2DConditionModel.from_pretrained(args.unet)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=args.rank,
            lora_alpha=args.rank,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    # The cache holds unscaled latents, as the VAE returns them.
    vae_config = json.loads((Path(args.vae) / "config.json").read_text())
    scaling = float(vae_config.get("scaling_factor", 0.18215))

    step, epoch = 0, 0
    generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)
    while step < args.steps:
        loader.set_epoch(epoch)
        for batch in loader:
            latents = batch["latents"].to(accelerator.device) * scaling
            context = batch["text_hidden_states"][0].to(accelerator.device, torch.float32)
            noise = torch.randn(latents.shape, generator=generator).to(latents.device)
            t = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
            noisy = scheduler.add_noise(latents, noise, t.to(latents.device))
            pred = unet(noisy, t.to(latents.device), encoder_hidden_states=context).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if accelerator.is_main_process:
                print(f"step {step} epoch {epoch} loss {loss.item():.4f}", flush=True)
            if not math.isfinite(loss.item()):
                raise SystemExit("loss is not finite")
            if step >= args.steps:
                break
        epoch += 1

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        weights = get_peft_model_state_dict(accelerator.unwrap_model(unet))
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, args.out)
        print(f"saved {len(weights)} LoRA tensors to {Path(args.out).resolve()}")
    # Every rank destroys the process group together, after rank 0 has saved: a rank that tears
    # its group down while another still works is a known way for destroy_process_group to hang
    # (pytorch/pytorch#75097).
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
