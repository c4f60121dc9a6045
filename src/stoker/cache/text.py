"""The text-encoder cache: one entry per distinct final caption, looked up by caption at run time.

An entry holds, for each text encoder, the hidden states of one caption (``(tokens, width)``) and
its pooled embedding when the encoder has one, keyed by the caption text and the encoders' and
tokenizers' digests and settings, so an edited caption never reuses an old entry. Every caption an
image can produce is cached (each line of a multi-line caption and each wildcard choice, with the
prefix and suffix), plus the empty caption, so caption dropout picks the empty entry at run time
and its rate is never baked in. Shuffle, tag dropout and token warm-up make a new caption every
step and are refused.

With ``padding="max_length"`` (default) the states of the padding tokens are stored too: CLIP's
causal attention makes them depend on the caption, and Stable Diffusion conditions on all of them.
With ``padding="longest"`` only the real tokens are stored and batches are padded with zeros at
collate time, with ``text_attention_masks`` saying which positions are real.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch

from stoker.cache.index import CacheIndex, CacheReport, hex_digests
from stoker.cache.keys import FORMAT_VERSION, combine, digest_strings, model_digest
from stoker.cache.latents import _report, cache_problem, storage_dtype
from stoker.cache.shards import DTYPES, ShardReader, TensorSpec, read_header, write_shard
from stoker.errors import CacheError

__all__ = ["TextReader", "cache_text_encoder_outputs", "check_text_cache", "open_text_cache"]

KIND = "text"
Padding = Literal["max_length", "longest"]
HiddenState = Literal["last", "penultimate"]
_MAX_VARIANTS = 1000
_SHARD_ENTRIES = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class TextSettings:
    """What a text entry depends on besides its caption (all part of its key).

    Attributes:
        encoders: weight digests of the text encoders, in order.
        tokenizers: digests of the tokenizers (vocabulary, merges, normaliser).
        max_length: tokens per caption (BOS and EOS included), per tokenizer.
        padding: ``"max_length"`` or ``"longest"`` (see the module docstring).
        hidden_state: ``"last"`` (``last_hidden_state``) or ``"penultimate"`` (``hidden_states[-2]``,
            SDXL's choice).
        dtype: storage dtype name.
    """

    encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    max_length: tuple[int, ...]
    padding: str
    hidden_state: str
    dtype: str

    def text(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def caption_keys(settings_text: str, captions: Sequence[str]) -> np.ndarray:
    """``(N, 2)`` digests of captions under settings: the text cache's keys."""
    return digest_strings(f"{KIND}|format={FORMAT_VERSION}|{settings_text}|{c}" for c in captions)


# --- which captions ------------------------------------------------------------------------------


def refuse_caption_rules(dataset: Any) -> None:
    """Raise ``CacheError`` for caption rules that make a new caption every step."""
    for subset in dataset.catalog.subsets:
        for key, on in (
            ("shuffle_caption", subset.shuffle_caption),
            ("caption_tag_dropout_rate", subset.caption_tag_dropout_rate > 0),
            ("token_warmup_step", subset.token_warmup_step > 0),
        ):
            if on:
                raise CacheError(
                    f"{subset.where or 'a subset'}: {key} makes a new caption every step, so no "
                    "cache of text-encoder outputs can hold them. Turn it off to cache text "
                    "outputs (caption dropout, wildcards and multi-line captions are fine), or "
                    "run the text encoders during training"
                )


class _Scripted:
    """Stands in for the generator in ``process_caption`` and walks every choice it offers."""

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.used = 0
        self.bounds: list[int] = []

    def integers(self, high: int) -> int:
        choice = self.script[self.used] if self.used < len(self.script) else 0
        self.used += 1
        self.bounds.append(int(high))
        return choice

    def random(self) -> float:
        return 1.0  # only dropout draws this, and it is off here


def caption_variants(caption: str, rules: Any) -> list[str]:
    """Every final caption ``caption`` can become under ``rules`` with dropout off, in order."""
    from stoker.data.captions import process_caption

    rules = dataclasses.replace(rules, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0)
    variants: dict[str, None] = {}
    script: list[int] | None = []
    while script is not None:
        rng = _Scripted(script)
        variants[process_caption(caption, rules, cast(np.random.Generator, rng))] = None
        if len(variants) > _MAX_VARIANTS:
            raise CacheError(
                f"caption {caption[:60]!r} has more than {_MAX_VARIANTS} wildcard combinations; "
                "too many to cache. Shorten its wildcards or train without a text cache"
            )
        script = _next_script(rng.script, rng.bounds)
    return list(variants)


def _next_script(script: list[int], bounds: list[int]) -> list[int] | None:
    """The next choice sequence, odometer style; ``None`` after the last."""
    full = [*script[: len(bounds)], *[0] * (len(bounds) - len(script))]
    for position in reversed(range(len(bounds))):
        if full[position] + 1 < bounds[position]:
            return [*full[:position], full[position] + 1]
    return None


def dataset_captions(dataset: Any) -> Iterator[tuple[int, list[str]]]:
    """``(image, its caption variants)`` for every image of ``dataset``."""
    rules = [s.caption_rules() for s in dataset.catalog.subsets]
    for image in range(len(dataset)):
        subset = int(dataset.catalog.subset[image])
        yield image, caption_variants(dataset.catalog.captions[image], rules[subset])


# --- loading encoders ----------------------------------------------------------------------------


def load_text_encoder(encoder: Any) -> Any:
    """A transformers text model: ``encoder`` itself, or the architecture its folder names."""
    if not isinstance(encoder, (str, os.PathLike)):
        return encoder
    folder = Path(encoder)
    try:
        import transformers
    except ImportError as err:
        raise CacheError(
            "loading a text encoder needs transformers: pip install 'stoker[cache]'"
        ) from err
    try:
        config = json.loads((folder / "config.json").read_text())
        cls = getattr(transformers, (config.get("architectures") or ["AutoModel"])[0])
    except (OSError, ValueError, AttributeError) as err:
        raise CacheError(f"{folder} is not a save_pretrained text-encoder folder ({err})") from err
    return cls.from_pretrained(folder)


def load_tokenizer(tokenizer: Any) -> Any:
    """A transformers tokenizer: ``tokenizer`` itself, or loaded from its folder."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(tokenizer))


def tokenizer_digest(tokenizer: Any) -> str:
    """A digest of a tokenizer's vocabulary, merges and normaliser (its full serialised form)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = (
        backend.to_str()
        if backend is not None
        else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    text += f"|{type(tokenizer).__name__}|{tokenizer.model_max_length}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


# --- checking ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TextCheck:
    """A dataset checked against a text cache (see ``LatentCheck``); ``captions`` holds every
    caption the dataset can produce (with ``""``) and ``caption_rows`` their index rows."""

    report: CacheReport
    captions: tuple[str, ...]
    caption_rows: np.ndarray
    settings_text: str
    index: CacheIndex


def check_text_cache(
    dataset: Any, cache_dir: str | os.PathLike[str], *, settings: TextSettings | None = None
) -> TextCheck:
    """Classify every image's captions against the text cache; settings default to the last build's."""
    refuse_caption_rules(dataset)
    index = CacheIndex.load(cache_dir, KIND)
    settings_text = settings.text() if settings else index.info.get("settings", "none")
    images, variants = [], []
    for image, captions in dataset_captions(dataset):
        images += [image] * len(captions)
        variants += captions
    image_of = np.asarray(images, np.int64)
    keys = caption_keys(settings_text, variants)
    paths = [os.path.abspath(dataset.catalog.paths[i]) for i in range(len(dataset))]
    slots = digest_strings(f"{KIND}|{p}" for p in paths)
    status, _ = index.classify(
        keys, combine(slots[image_of], np.zeros(len(keys), np.int64)), slots[image_of]
    )
    per_image = np.zeros(len(dataset), np.int8)
    np.maximum.at(per_image, image_of, status)  # an image is as bad as its worst caption
    distinct = tuple(dict.fromkeys(["", *variants]))
    rows = index.find(caption_keys(settings_text, distinct))
    report = _report(index, paths, per_image, cache_dir)
    if report.ok and (rows < 0).any():  # the empty caption, kept for dropout at run time
        report = dataclasses.replace(report, missing=1, missing_examples=("(empty caption)",))
    return TextCheck(
        report=report,
        captions=distinct,
        caption_rows=rows,
        settings_text=settings_text,
        index=index,
    )


# --- building ------------------------------------------------------------------------------------


def cache_text_encoder_outputs(
    dataset: Any,
    text_encoders: Any,
    tokenizers: Any,
    *,
    cache_dir: str | os.PathLike[str],
    dtype: str = "bfloat16",
    device: str | torch.device | None = None,
    batch_size: int = 32,
    max_length: int | Sequence[int] | None = None,
    padding: Padding = "max_length",
    hidden_state: HiddenState = "last",
    progress: Callable[[int, int], None] | None = None,
) -> CacheReport:
    """Encode every distinct caption of ``dataset`` (and ``""``) that the cache lacks.

    Args:
        dataset: a ``StokerDataset`` (``stoker.load_dataset``).
        text_encoders: one transformers text model (``CLIPTextModel``, ...) or a sequence (SDXL: two),
            or their ``save_pretrained`` folders.
        tokenizers: the matching tokenizers, or their folders.
        cache_dir: the cache folder (created if needed).
        dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        device: where the encoders run; default: where their weights are.
        batch_size: captions per encoder call.
        max_length: tokens per caption; default: each tokenizer's ``model_max_length``.
        padding, hidden_state: see ``TextSettings``.
        progress: ``progress(done, total)``; default: a bar on a terminal.

    Raises:
        CacheError: shuffle, tag dropout or warm-up is on, or the encoders and tokenizers differ
            in number.
    """
    from stoker.cache.latents import _distributed
    from stoker.progress import progress_bar

    refuse_caption_rules(dataset)
    encoders = [load_text_encoder(e) for e in _as_list(text_encoders)]
    toks = [load_tokenizer(t) for t in _as_list(tokenizers)]
    if len(encoders) != len(toks) or not encoders:
        raise CacheError(
            f"give one tokenizer per text encoder: got {len(encoders)} encoders and {len(toks)} tokenizers"
        )
    if padding not in ("max_length", "longest") or hidden_state not in ("last", "penultimate"):
        raise ValueError(
            "padding must be 'max_length' or 'longest'; hidden_state 'last' or 'penultimate'"
        )
    lengths = _as_list(max_length) if max_length is not None else [t.model_max_length for t in toks]
    settings = TextSettings(
        encoders=tuple(model_digest(e) for e in encoders),
        tokenizers=tuple(tokenizer_digest(t) for t in toks),
        max_length=tuple(int(n) for n in lengths),
        padding=padding,
        hidden_state=hidden_state,
        dtype=storage_dtype(dtype),
    )
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    rank, world, dist = _distributed()
    check = check_text_cache(dataset, folder, settings=settings)
    if dist is not None:
        dist.barrier()
    todo = [
        c for c, row in zip(check.captions, check.caption_rows.tolist(), strict=True) if row < 0
    ]
    todo = todo[rank::world]
    bar = progress or progress_bar(f"stoker: caching text (rank {rank})", "captions")
    writer = _TextShards(folder, settings, _image_slots(dataset, check.settings_text), rank)
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            writer.add(chunk, _encode_captions(encoders, toks, chunk, settings, device))
            if bar is not None:
                bar(min(start + batch_size, len(todo)), len(todo))
    finally:
        writer.flush()
    if dist is not None:
        dist.barrier()
    if rank == 0:
        index = CacheIndex.load(folder, KIND)
        index.info = {"settings": settings.text()}
        index.save()
    if dist is not None:
        dist.barrier()
    final = check_text_cache(dataset, folder, settings=settings).report
    return dataclasses.replace(final, encoded=writer.written)


def _image_slots(dataset: Any, settings_text: str) -> dict[str, list[np.ndarray]]:
    """For each caption, the slots of the images that produce it (recorded for stale reports)."""
    users: dict[str, list[np.ndarray]] = {}
    paths = [os.path.abspath(dataset.catalog.paths[i]) for i in range(len(dataset))]
    slots = digest_strings(f"{KIND}|{p}" for p in paths)
    for image, captions in dataset_captions(dataset):
        for caption in captions:
            users.setdefault(caption, []).append(slots[image])
    return users


@torch.no_grad()
def _encode_captions(
    encoders: list[Any],
    tokenizers: list[Any],
    captions: list[str],
    settings: TextSettings,
    device: Any,
) -> list[list[tuple[str, torch.Tensor]]]:
    """Per caption, its tensors ``hidden.{e}`` (tokens, width) and ``pooled.{e}`` (width)."""
    store = DTYPES[settings.dtype]
    out: list[list[tuple[str, torch.Tensor]]] = [[] for _ in captions]
    for e, (encoder, tokenizer) in enumerate(zip(encoders, tokenizers, strict=True)):
        target = torch.device(device) if device is not None else next(encoder.parameters()).device
        tokens = tokenizer(
            captions,
            padding="max_length" if settings.padding == "max_length" else "longest",
            truncation=True,
            max_length=settings.max_length[e],
            return_tensors="pt",
        )
        mask = tokens["attention_mask"]
        result = encoder(
            input_ids=tokens["input_ids"].to(target),
            attention_mask=mask.to(target) if settings.padding == "longest" else None,
            output_hidden_states=True,
        )
        hidden = (
            result.last_hidden_state
            if settings.hidden_state == "last"
            else result.hidden_states[-2]
        )
        pooled = getattr(result, "text_embeds", None)
        if pooled is None:
            pooled = getattr(result, "pooler_output", None)
        for i in range(len(captions)):
            keep = int(mask[i].sum()) if settings.padding == "longest" else hidden.shape[1]
            out[i].append((f"hidden.{e}", hidden[i, :keep].to(store).cpu().contiguous()))
            out[i].append((f"length.{e}", torch.tensor([int(mask[i].sum())], dtype=torch.int32)))
            if pooled is not None:
                out[i].append((f"pooled.{e}", pooled[i].to(store).cpu().contiguous()))
    return out


class _TextShards:
    """Writes text entries with one index row per (caption, image using it)."""

    def __init__(
        self,
        folder: Path,
        settings: TextSettings,
        users: dict[str, list[np.ndarray]],
        rank: int = 0,
    ) -> None:
        self.folder = folder
        self.rank = rank
        self.settings_text = settings.text()
        self.users = users
        self.pending: list[tuple[str, list[tuple[str, torch.Tensor]]]] = []
        self.written = 0

    def add(self, captions: list[str], tensors: list[list[tuple[str, torch.Tensor]]]) -> None:
        self.pending += list(zip(captions, tensors, strict=True))
        if len(self.pending) >= _SHARD_ENTRIES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        captions = [c for c, _ in self.pending]
        keys = caption_keys(self.settings_text, captions)
        rows: dict[str, list[Any]] = {"key": [], "slot": [], "entry": []}
        tensors = []
        for n, (caption, parts) in enumerate(self.pending):
            tensors += [(f"{n}.{name}", t) for name, t in parts]
            for slot in self.users.get(caption) or [np.zeros(2, np.uint64)]:
                rows["key"].append(keys[n])
                rows["slot"].append(slot)
                rows["entry"].append(n)
        key = np.stack(rows["key"])
        slot = np.stack(rows["slot"])
        entries = {
            "key": hex_digests(key),
            "recipe_slot": hex_digests(combine(slot, np.zeros(len(slot), np.int64))),
            "slot": hex_digests(slot),
            "content": hex_digests(np.zeros_like(key)),
        }
        record = {
            "format": FORMAT_VERSION,
            "kind": KIND,
            "info": {"settings": self.settings_text},
            "entries": entries,
            "entry": rows["entry"],
        }
        name = f"{KIND}-r{self.rank}-{secrets.token_hex(8)}.safetensors"
        write_shard(self.folder / name, tensors, {"stoker": json.dumps(record)})
        self.written += len(self.pending)
        self.pending = []


# --- reading -------------------------------------------------------------------------------------


class TextReader:
    """Caption -> cached encoder outputs, for the captions a dataset can produce. Picklable."""

    def __init__(self, folder: Path, check: TextCheck) -> None:
        index = check.index
        self.settings_text = check.settings_text
        self.padding = json.loads(self.settings_text)["padding"]
        used = sorted({int(index.columns["shard"][r]) for r in check.caption_rows.tolist()})
        self.shards = [
            ShardReader(folder / index.shard_names[s], index.shard_sizes[s]) for s in used
        ]
        remap = {s: i for i, s in enumerate(used)}
        headers = {s: read_header(folder / index.shard_names[s])[0] for s in used}
        self.places: dict[bytes, tuple[int, dict[str, TensorSpec]]] = {}
        keys = caption_keys(self.settings_text, check.captions)
        for key, row in zip(keys, check.caption_rows.tolist(), strict=True):
            s, n = int(index.columns["shard"][row]), int(index.columns["entry"][row])
            prefix = f"{n}."
            parts = {k[len(prefix) :]: v for k, v in headers[s].items() if k.startswith(prefix)}
            self.places[key.tobytes()] = (remap[s], parts)
        self.encoders = sum(
            1 for name in next(iter(self.places.values()))[1] if name.startswith("hidden.")
        )

    def outputs(self, caption: str) -> dict[str, torch.Tensor]:
        """The cached tensors of ``caption`` (``hidden.{e}``, ``length.{e}``, ``pooled.{e}``)."""
        key = caption_keys(self.settings_text, [caption])[0].tobytes()
        try:
            shard, parts = self.places[key]
        except KeyError:
            raise CacheError(
                f"caption {caption[:60]!r} is not in the text cache; build it again for this "
                "dataset (stoker cache SOURCE ... --text-encoder ...)"
            ) from None
        return {name: self.shards[shard].tensor(spec) for name, spec in parts.items()}

    def collate(self, captions: Sequence[str]) -> dict[str, Any]:
        """Batch keys for ``captions``: per encoder, hidden states padded to one length, masks, pooled."""
        entries = [self.outputs(c) for c in captions]
        hidden, masks, pooled = [], [], []
        for e in range(self.encoders):
            states = [x[f"hidden.{e}"] for x in entries]
            width = max(s.shape[0] for s in states)
            batch = torch.zeros((len(states), width, states[0].shape[1]), dtype=states[0].dtype)
            mask = torch.zeros((len(states), width), dtype=torch.bool)
            for i, (s, x) in enumerate(zip(states, entries, strict=True)):
                batch[i, : s.shape[0]] = s
                mask[i, : int(x[f"length.{e}"][0])] = True
            hidden.append(batch)
            masks.append(mask)
            if f"pooled.{e}" in entries[0]:
                pooled.append(torch.stack([x[f"pooled.{e}"] for x in entries]))
        out: dict[str, Any] = {"text_hidden_states": hidden, "text_attention_masks": masks}
        if pooled:
            out["text_pooled"] = pooled
        return out


def open_text_cache(dataset: Any, cache_dir: str | os.PathLike[str]) -> TextReader:
    """The reader of a complete text cache for ``dataset``.

    Raises:
        CacheError: entries are stale or missing (counts, examples, the fix), or a caption rule
            the cache cannot serve.
    """
    check = check_text_cache(dataset, cache_dir)
    if not check.report.ok:
        raise cache_problem(
            check.report,
            f"stoker cache <dataset> --text-encoder <folder> --tokenizer <folder> "
            f"--cache-dir {cache_dir}, or stoker.cache_text_encoder_outputs(...)",
        )
    return TextReader(Path(cache_dir), check)
