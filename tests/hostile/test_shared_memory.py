"""A real, small /dev/shm: the loader raises SharedMemoryFull in seconds instead of waiting forever.

Needs root and ``unshare``: the run gets a private mount namespace with a 2 MB tmpfs on /dev/shm,
so nothing outside the test sees it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, {hostile!r})
    import cases, stoker
    folder = Path({folder!r})
    ds = stoker.load_dataset(folder / "train", resolution=512, on_error="skip", batch_size=4)
    try:
        for batch in stoker.make_loader(ds, workers=2, monitor=False):
            pass
    except stoker.SharedMemoryFull as err:
        print("SharedMemoryFull:", err)
    else:
        print("no error")
    """
)


@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)
def test_a_full_dev_shm_raises_shared_memory_full_in_seconds(tmp_path: Path) -> None:
    import cases

    cases.good(tmp_path, count=8, size=(512, 512))  # 4 x 3 x 512 x 512 floats: 12 MB a batch
    script = _SCRIPT.format(hostile=str(Path(cases.__file__).parent), folder=str(tmp_path))
    (tmp_path / "run.py").write_text(script)
    command = (
        f"mount -t tmpfs -o size=2m tmpfs /dev/shm && exec {sys.executable} {tmp_path / 'run.py'}"
    )
    try:
        # Before the fix the loader waited forever here; 120 s is far above the few seconds it takes.
        done = subprocess.run(
            ["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the loader hung on a full /dev/shm instead of raising SharedMemoryFull")
    if "mount" in done.stderr and done.returncode != 0 and "SharedMemoryFull" not in done.stdout:
        pytest.skip(f"cannot mount a private tmpfs here: {done.stderr.strip()[-200:]}")
    assert "SharedMemoryFull:" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "docker run --shm-size" in done.stdout
