"""Checks a scan adds on top of the report: captions nobody reads, images without one, empty subsets.

These are not bad files (``report.problems``) but settings that are probably not what the user
meant: sd-scripts' default caption extension is ``.caption``, so a folder of ``.txt`` captions is
silently captioned with the class tokens instead; a subset with no images trains nothing.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CAPTION_SUFFIXES", "Finding", "check_dataset"]

CAPTION_SUFFIXES = frozenset({".txt", ".caption", ".cap", ".tags", ".tag"})
"""File suffixes that hold captions in the datasets people train on."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    """One thing a scan found worth saying.

    Attributes:
        kind: ``"empty_subset"``, ``"ignored_captions"`` or ``"no_caption_file"``.
        folder: the subset's folder (or metadata file).
        message: what was found and what to do, in one or two sentences.
        serious: true when it is almost surely a mistake (``stoker scan`` exits with 1).
        key: the dataset key that fixes it, when one does (``caption_extension``).
        value: the value for ``key``.
    """

    kind: str
    folder: str
    message: str
    serious: bool
    key: str | None = None
    value: str | None = None


def check_dataset(dataset: Any) -> tuple[Finding, ...]:
    """Findings for a ``load_dataset`` dataset, subset by subset (reads each image folder once)."""
    catalog = dataset.catalog
    found: list[Finding] = []
    for index, subset in enumerate(catalog.subsets):
        members = [catalog.paths[i] for i in _indices(catalog.subset, index)]
        folder = str(subset.image_dir or subset.metadata_file or "")
        if not members:
            found.append(
                Finding(
                    kind="empty_subset",
                    folder=folder,
                    message=f"{folder}: no images, so its num_repeats = {subset.num_repeats} "
                    "adds nothing; add images or remove the subset",
                    serious=True,
                )
            )
            continue
        if subset.kind == "finetuning" or subset.image_dir is None:
            continue  # captions come from the metadata file
        found += _caption_findings(folder, members, subset.caption_extension, subset.class_tokens)
    return tuple(found)


def _indices(owners: Any, index: int) -> list[int]:
    return [i for i, owner in enumerate(owners.tolist()) if owner == index]


def _caption_findings(
    folder: str, images: list[str], extension: str, class_tokens: str | None
) -> list[Finding]:
    names_by_dir: dict[str, set[str]] = {}
    without = 0
    other: Counter[str] = Counter()
    for image in images:
        parent, name = os.path.split(image)
        if parent not in names_by_dir:
            try:
                names_by_dir[parent] = set(os.listdir(parent))
            except OSError:
                names_by_dir[parent] = set()
        names = names_by_dir[parent]
        stem = Path(name).stem
        if stem + extension in names:
            continue
        without += 1
        other.update(s for s in CAPTION_SUFFIXES - {extension} if stem + s in names)
    found = []
    if other:
        suffix, count = other.most_common(1)[0]
        found.append(
            Finding(
                kind="ignored_captions",
                folder=folder,
                message=f"{folder}: {count} {suffix} caption files are not read: captions are "
                f"read from {extension} files (caption_extension)",
                serious=True,
                key="caption_extension",
                value=suffix,
            )
        )
    if without:
        fallback = (
            f"they are captioned with the class tokens {class_tokens!r}"
            if class_tokens
            else "they have no caption"
        )
        found.append(
            Finding(
                kind="no_caption_file",
                folder=folder,
                message=f"{folder}: {without} of {len(images)} "
                f"{'image has' if len(images) == 1 else 'images have'} no {extension} file; "
                f"{fallback}",
                serious=False,
            )
        )
    return found
