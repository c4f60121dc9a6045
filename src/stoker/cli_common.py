"""What every ``stoker`` command shares: loading the dataset from the source flags, and JSON output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import stoker

__all__ = ["SOURCE_FLAGS", "jsonable", "load_from_args", "print_json"]


def jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def print_json(obj: Any) -> None:
    print(json.dumps(jsonable(obj), indent=2))


# The dataset keys the flags above set, and their flags: errors from the CLI name the flag.
SOURCE_FLAGS = {
    "caption_extension": "--caption-extension",
    "enable_bucket": "--enable-bucket",
    "batch_size": "--batch-size",
    "min_bucket_reso": "--min-bucket-reso",
    "max_bucket_reso": "--max-bucket-reso",
    "bucket_reso_steps": "--bucket-reso-steps",
    "bucket_no_upscale": "--bucket-no-upscale",
}


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    settings = {key: getattr(args, key) for key in SOURCE_FLAGS}
    for item in args.settings:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(
                f"--set {item!r} is not valid: use KEY=VALUE, e.g. --set keep_tokens=1"
            )
        settings[key] = toml_value(text.strip())
    return {key: value for key, value in settings.items() if value is not None}


def toml_value(text: str) -> Any:
    """``true`` -> True, ``1`` -> 1, ``[2.0, 4.0]`` -> [2.0, 4.0]; anything else is a string."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the tomli backport, as the config parser uses
        import tomli as tomllib
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text.strip("'\"")


def load_from_args(args: argparse.Namespace, **kwargs: Any) -> Any:
    """``load_dataset`` with the command line's source options; its warnings are kept in
    ``args.load_warnings`` so that each is said once, where the command renders its result."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", stoker.StokerWarning)
        dataset = stoker.load_dataset(
            args.source,
            resolution=args.resolution,
            reg_data_dir=args.reg_data_dir,
            image_dir=args.image_dir,
            links_outside=args.links_outside,
            **settings_from_args(args),
            **kwargs,
        )
    told = list(dict.fromkeys(str(w.message) for w in caught))
    args.load_warnings = told
    return dataset
