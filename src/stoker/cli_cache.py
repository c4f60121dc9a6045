"""``stoker cache``: build the latent and text-encoder caches of a dataset from the command line."""

from __future__ import annotations

import argparse
from typing import Any

import stoker


def add_cache_parser(sub: Any, add_source_options: Any) -> None:
    """Register ``stoker cache`` on the subcommand parsers ``sub``."""
    cache = sub.add_parser(
        "cache",
        help="encode a dataset's latents (and text-encoder outputs) into a cache",
        description="Encode every image (and caption) the cache lacks or holds stale, exactly as "
        "training loads it, into safetensors shards with one index. Resumable: a killed run "
        "keeps its shards. Train from it with load_dataset(..., latent_cache=DIR, text_cache=DIR) "
        "or the same keys in the dataset config. Under torchrun every rank encodes its share.",
    )
    add_source_options(cache)
    cache.add_argument("--vae", required=True, metavar="DIR", help="AutoencoderKL folder")
    cache.add_argument(
        "--text-encoder",
        action="append",
        default=[],
        metavar="DIR",
        help="text encoder folder (repeat for SDXL's two)",
    )
    cache.add_argument(
        "--tokenizer",
        action="append",
        default=[],
        metavar="DIR",
        help="tokenizer folder, one per --text-encoder",
    )
    cache.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="cache folder (default: latent_cache / text_cache of the dataset config)",
    )
    cache.add_argument(
        "--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="storage dtype"
    )
    cache.add_argument("--device", default=None, help="where the encoders run (cpu, cuda, ...)")
    cache.add_argument("--batch-size", type=int, default=None, help="images per VAE call")
    cache.add_argument("--json", action="store_true", help="print the reports as JSON")
    cache.set_defaults(run=run_cache)


def _folders(args: argparse.Namespace, dataset: Any) -> tuple[Any, Any]:
    latent = args.cache_dir or dataset.datasets[0].latent_cache
    text = args.cache_dir or dataset.datasets[0].text_cache or latent
    if latent is None:
        raise ValueError("give --cache-dir DIR, or set latent_cache in the dataset config")
    return latent, text


def run_cache(args: argparse.Namespace) -> int:
    """Build the caches; exit code 1 when entries are still missing (unreadable images)."""
    if len(args.text_encoder) != len(args.tokenizer):
        raise ValueError("give one --tokenizer per --text-encoder")
    joined = _join_torchrun()
    try:
        return _build(args)
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def _build(args: argparse.Namespace) -> int:
    from stoker.cli import _load_from_args, _print_json

    dataset = _load_from_args(args, latent_cache=False, text_cache=False)
    latent_dir, text_dir = _folders(args, dataset)
    reports = [
        stoker.cache_latents(
            dataset,
            args.vae,
            cache_dir=latent_dir,
            dtype=args.dtype,
            device=args.device,
            batch_size=args.batch_size,
        )
    ]
    if args.text_encoder:
        reports.append(
            stoker.cache_text_encoder_outputs(
                dataset,
                args.text_encoder,
                args.tokenizer,
                cache_dir=text_dir,
                dtype=args.dtype,
                device=args.device,
            )
        )
    if args.json:
        _print_json(reports)
    else:
        for report in reports:
            print(f"{report.summary()}; encoded {report.encoded} now, {report.shards} shards")
    return 0 if all(r.ok for r in reports) else 1


def _join_torchrun() -> bool:
    """Under torchrun, join the process group so each rank encodes its own share; joined?"""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        import torch

        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        return True
    return False


def render_cache_state(dataset: Any, latent_cache: Any, text_cache: Any) -> list[str]:
    """Lines for ``stoker scan``: each configured cache's valid/stale/missing counts."""
    lines = []
    for kind, folder in (("latent", latent_cache), ("text", text_cache)):
        if folder is None:
            continue
        try:
            (report,) = stoker.check_caches(
                dataset,
                latent_cache=folder if kind == "latent" else False,
                text_cache=folder if kind == "text" else False,
            )
        except stoker.CacheError as err:
            lines.append(f"{kind} cache {folder}: cannot be used: {err}")
            continue
        state = "ready" if report.ok else "run stoker cache to update it"
        lines.append(f"{report.summary()} ({state})")
    return lines
