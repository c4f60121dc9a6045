"""The hostile-input corpus (cases.py), each case in a subprocess with a timeout, several per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cases
import pytest

_HERE = Path(__file__).resolve().parent
# Cases whose fix has not landed yet: they must still fail (strict), and leave this set when fixed.
_PENDING: set[str] = set()
_PER_PROCESS = 12
_CASE_SECONDS = 30


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Build every case, run them in chunks of subprocesses, collect one outcome per case."""
    root = tmp_path_factory.mktemp("hostile")
    names = sorted(cases.CASES)
    args = []
    for name in names:
        folder = root / name
        folder.mkdir()
        cases.CASES[name].build(folder)
        args.append(f"{name}={folder}")
    results: dict[str, dict[str, Any]] = {}
    env = {**os.environ, "STOKER_CASE_SECONDS": str(_CASE_SECONDS), "PYTHONWARNINGS": "ignore"}
    for start in range(0, len(args), _PER_PROCESS):
        chunk = args[start : start + _PER_PROCESS]
        try:
            done = subprocess.run(
                [sys.executable, str(_HERE / "driver.py"), *chunk],
                capture_output=True,
                text=True,
                timeout=_CASE_SECONDS * len(chunk) + 60,
                env=env,
            )
            out, err = done.stdout, done.stderr
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err = "the driver hung"
        for line in out.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                results[record["case"]] = record
        for arg in chunk:
            name = arg.partition("=")[0]
            results.setdefault(name, {"outcome": "crash", "detail": err[-3000:]})
    return results


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="fix pending"))
        if n in _PENDING
        else n
        for n in sorted(cases.CASES)
    ],
)
def test_case_has_its_promised_outcome(name: str, outcomes: dict[str, dict[str, Any]]) -> None:
    case, got = cases.CASES[name], outcomes[name]
    expected_class, _, expected_detail = case.expect.partition(":")
    assert got["outcome"] == expected_class, got
    if expected_class == "error":
        assert got["error"] == expected_detail, got
    if expected_class == "skip":
        assert expected_detail in got["kinds"], got
    assert case.match in got["detail"], got
    if case.warns:
        assert any(case.warns in w for w in got["warnings"]), got
