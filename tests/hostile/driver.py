"""Run hostile-input cases in this process and print one JSON line of outcome per case.

Usage: ``python driver.py CASE=FOLDER ...``. Each case runs under an alarm (``STOKER_CASE_SECONDS``),
so one hang is reported as ``hang`` and the next case still runs. Outcome classes:
``works`` (no problem reported), ``skip`` (problems reported, with their kinds), ``error`` (a stoker
error or ValueError, with its class), ``traceback`` (any other exception: a defect) and ``hang``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402

from stoker.errors import StokerError  # noqa: E402


class _Hang(BaseException):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Hang


def run_case(name: str, folder: Path, seconds: int) -> dict[str, Any]:
    case = cases.CASES[name]
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(seconds)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            problems = case.run(folder)
        signal.alarm(0)
    except _Hang:
        return {"outcome": "hang", "detail": f"no result within {seconds} s"}
    except (StokerError, ValueError) as err:
        signal.alarm(0)
        return {"outcome": "error", "error": type(err).__name__, "detail": str(err)[:2000]}
    except BaseException as err:  # noqa: BLE001 - every other exception is the defect we look for
        signal.alarm(0)
        return {
            "outcome": "traceback",
            "error": type(err).__name__,
            "detail": "".join(traceback.format_exception(err))[-3000:],
        }
    kinds = sorted({p.kind for p in problems})
    return {
        "outcome": "skip" if problems else "works",
        "kinds": kinds,
        "detail": "; ".join(f"{p.path}: {p.reason}" for p in problems)[:2000],
        "warnings": [str(w.message)[:300] for w in caught],
    }


def main(argv: list[str]) -> int:
    seconds = int(os.environ.get("STOKER_CASE_SECONDS", "30"))
    for arg in argv:
        name, _, folder = arg.partition("=")
        result = run_case(name, Path(folder), seconds)
        print(json.dumps({"case": name, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
