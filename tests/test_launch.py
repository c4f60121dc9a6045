"""The launch helper turns a hung run into a failure that shows where each process stood."""

from __future__ import annotations

import pytest

import launch

HANGS = """
import time

def waits_forever():
    time.sleep(1000)

print("started", flush=True)
waits_forever()
"""


def test_a_hung_run_fails_with_the_stack_of_its_process():
    with pytest.raises(pytest.fail.Exception) as failed:
        launch.run([*launch.launcher(1), "-c", HANGS], env=launch.launch_env(), timeout=3)
    message = str(failed.value)
    assert "hung for 3 s" in message
    stacks = message.partition("The stacks of its processes")[2]
    assert "in waits_forever" in stacks and "started" in message


def test_a_failed_run_fails_with_its_stderr_when_checked():
    command = [*launch.launcher(1), "-c", "raise SystemExit('the reason')"]
    assert launch.run(command, env=launch.launch_env()).returncode == 1
    with pytest.raises(pytest.fail.Exception, match="the reason"):
        launch.run(command, env=launch.launch_env(), check=True)
