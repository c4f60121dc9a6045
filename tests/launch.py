"""Start a script in its own processes (one, or several under torchrun) and never hang the suite.

A multi-process run that hangs is the hardest failure to read: a timeout says only that it hung.
So every launched process runs with faulthandler on, and on a timeout each one (the torchrun agent
and every rank and worker below it) is sent SIGABRT, which makes it print the stack of each of its
threads before it dies. The test then fails with those stacks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launcher(ranks: int) -> list[str]:
    """The command prefix that runs a script as ``ranks`` processes on this machine."""
    if ranks == 1:
        return [sys.executable]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={ranks}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
    ]


def launch_env() -> dict[str, str]:
    """This process's environment for a launched run: one thread per rank, the CPUs as the
    machine counts them (no STOKER_CPUS), and faulthandler on for the stacks of a hang."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    env.pop("STOKER_CPUS", None)
    return env


def run(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float = 300,
    cwd: Path | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` to its end; on ``timeout``, fail with the stacks of every process it
    started. With ``check``, a non-zero exit fails the test with the end of its stderr."""
    # Files, not pipes: what a hung run wrote before the abort stays apart from the stacks.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(list(command), env=dict(env), cwd=cwd, stdout=out, stderr=err)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            before = os.fstat(err.fileno()).st_size
            _abort_tree(process.pid)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            pytest.fail(
                f"{' '.join(command[:6])} ... hung for {timeout:g} s.\n"
                f"Its stderr before:\n{_read(err, 0)[:before][-3000:]}\n"
                f"The stacks of its processes (SIGABRT with faulthandler on):\n{_read(err, before)}"
                f"\nstdout:\n{_read(out, 0)[-2000:]}"
            )
        done = subprocess.CompletedProcess(
            list(command), process.returncode, _read(out, 0), _read(err, 0)
        )
    if check and done.returncode != 0:
        pytest.fail(f"exit code {done.returncode}:\n{done.stderr[-4000:]}")
    return done


def _read(file: IO[str], offset: int) -> str:
    file.seek(offset)
    return file.read()


def _abort_tree(pid: int) -> None:
    """SIGABRT ``pid`` and everything below it, deepest first, so each prints its stacks before
    its parent reacts to the death of its children. torchrun starts each rank in a session of
    its own, so the tree is walked, not the process group signalled."""
    tree = [pid]
    parents = _parents()
    for member in tree:  # grows while it is walked: breadth first
        tree += [child for child, parent in parents.items() if parent == member]
    for member in reversed(tree):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGABRT)
        time.sleep(1)  # one at a time: their stacks share one stderr


def _parents() -> dict[int, int]:
    """Every process's parent, from /proc (the field after the parenthesised command name)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # it ended while the scan ran
        parents[int(stat.parent.name)] = int(fields[1])
    return parents
