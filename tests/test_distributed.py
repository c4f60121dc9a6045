"""Many processes and long runs: torchrun sharding, exact resume, dead workers, Ctrl-C."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import pytest

from stoker import SharedMemoryFull, WorkerFailed, load_dataset, make_loader
from stoker.data.synthetic import write_sample_dataset
from stoker.loader.failures import explain_failure
from stoker.system.platform import distributed_from_env


@pytest.fixture
def sample(tmp_path):
    return write_sample_dataset(tmp_path / "sample", images=12, seed=5, resolution=256)


def keys_of(batch):
    return batch["image_keys"], batch["captions"]


def test_rank_and_world_size_come_from_torchrun_variables():
    assert distributed_from_env({"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)
    assert distributed_from_env({}) == (0, 1)
    assert distributed_from_env({"RANK": "9", "WORLD_SIZE": "8"}) == (0, 1)
    assert distributed_from_env({"RANK": "x", "WORLD_SIZE": "2"}) == (0, 1)


def test_explicit_ranks_shard_whole_batches(sample):
    ds = load_dataset(sample.config)
    full = make_loader(ds, seed=1, shuffle=True, workers=0, budget=1)
    parts = [
        make_loader(
            ds, seed=1, shuffle=True, workers=0, budget=1, rank=r, world_size=3, even_batches="drop"
        )
        for r in range(3)
    ]
    assert len({len(p) for p in parts}) == 1
    everything = Counter(k for b in full for k in b["image_keys"])
    sharded = Counter(k for p in parts for b in p for k in b["image_keys"])
    # No sample is served more often than in the unsharded epoch, and only the remainder that
    # does not fill a batch on every rank is dropped (at most world_size - 1 batches).
    assert not sharded - everything
    assert len(full) - 3 * len(parts[0]) < 3
    padded = [
        make_loader(ds, seed=1, shuffle=True, workers=0, budget=1, rank=r, world_size=3)
        for r in range(3)
    ]
    served = Counter(k for p in padded for b in p for k in b["image_keys"])
    assert not everything - served  # "pad" serves every sample at least once


@pytest.mark.slow
def test_resume_mid_epoch_with_another_worker_count(sample):
    ds = load_dataset(sample.config.parent / "dataset.toml")
    reference = make_loader(ds, seed=4, shuffle=True, workers=0, budget=2)
    uninterrupted = [keys_of(b) for _ in range(2) for b in reference]

    first = make_loader(ds, seed=4, shuffle=True, workers=2, budget=2, persistent=False)
    got = []
    for i, batch in enumerate(first):
        got.append(keys_of(batch))
        if i == 6:
            break
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint would store
    del first

    resumed = make_loader(ds, seed=4, shuffle=True, workers=1, budget=2, persistent=False)
    resumed.load_state_dict(state)
    for _ in range(2):  # the rest of epoch 0, then all of epoch 1
        got += [keys_of(b) for b in resumed]
    assert got == uninterrupted


@pytest.mark.slow
def test_killed_worker_is_named_with_what_it_was_loading(sample):
    ds = load_dataset(sample.config)
    loader = make_loader(ds, seed=0, workers=2, budget=2, timeout=30, persistent=False)
    it = iter(loader)
    next(it)
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    victim = workers[0].pid
    # Kill from another thread while this one waits inside the loader, as the OOM killer would.
    threading.Timer(0.2, os.kill, (victim, signal.SIGKILL)).start()
    started = time.monotonic()
    with pytest.raises(WorkerFailed) as err:
        for _ in it:
            time.sleep(0.05)
    assert time.monotonic() - started < 30
    text = str(err.value)
    assert f"pid {victim}" in text and "killed by signal SIGKILL" in text
    assert "It was loading: " in text
    assert multiprocessing.active_children() == []  # no zombies left behind


CTRL_C = textwrap.dedent(
    """
    import multiprocessing, sys, time
    import stoker
    ds = stoker.load_dataset(sys.argv[1])
    loader = stoker.make_loader(ds, seed=0, workers=2, budget=2)
    for i, batch in enumerate(loader):
        if i == 0:
            print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
        time.sleep(0.2)
    """
)


@pytest.mark.slow
def test_ctrl_c_exits_cleanly_without_orphans(sample):
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C, str(sample.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_full_shared_memory_gets_a_fix_in_the_message():
    err = RuntimeError("unable to write to file </torch_81_2934_0>: No space left on device (28)")
    explained = explain_failure(err, object(), None)
    assert isinstance(explained, SharedMemoryFull)
    assert "--shm-size" in str(explained)


TORCHRUN = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    import stoker
    dist.init_process_group("gloo")
    ds = stoker.load_dataset(sys.argv[1])
    loader = stoker.make_loader(ds, seed=7, shuffle=True)
    epochs = []
    for epoch in range(2):
        keys = [[list(k) for k in loader.batch_sampler.epoch_batches(epoch)]]
        seen = [(b["image_keys"], len(b["captions"])) for b in loader]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {"batches": keys[0], "seen": seen,
                                          "cpus": loader.plan.budget.cpus})
        epochs.append(gathered)
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(epochs, f)
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.torchrun
def test_torchrun_two_ranks_split_every_epoch(sample, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TORCHRUN)
    out = tmp_path / "ranks.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("STOKER_CPUS", None)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            str(script),
            str(sample.config),
            str(out),
        ],
        check=True,
        timeout=300,
        env=env,
        capture_output=True,
    )
    epochs = json.loads(out.read_text())
    ds = load_dataset(sample.config)
    total = ds.report.samples_per_epoch
    for gathered in epochs:
        rank0, rank1 = gathered
        assert len(rank0["batches"]) == len(rank1["batches"])  # equal batch counts
        positions = [[k[1] for b in r["batches"] for k in b] for r in (rank0, rank1)]
        padded = set(positions[0]) & set(positions[1])
        # pad policy: overlap only where the epoch's first batches were repeated to even out
        assert len(padded) <= max(len(b) for r in (rank0, rank1) for b in r["batches"])
        assert set(positions[0]) | set(positions[1]) == set(range(total))
        for r in (rank0, rank1):
            assert [len(b) for b in r["batches"]] == [n for _, n in r["seen"]]
            assert r["cpus"] >= 1
