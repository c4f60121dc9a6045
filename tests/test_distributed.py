"""Many processes and long runs: torchrun sharding, exact resume, dead workers, Ctrl-C."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import pytest

import launch
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
        keys = [[list(k) for k in loader.rank_sampler.epoch_batches(epoch)]]
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


@pytest.mark.slow
@pytest.mark.torchrun
def test_torchrun_two_ranks_split_every_epoch(sample, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TORCHRUN)
    out = tmp_path / "ranks.json"
    launch.run(
        [*launch.launcher(2), str(script), str(sample.config), str(out)],
        env=launch.launch_env(),
        check=True,
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


ACCELERATE = textwrap.dedent(
    """
    import json, sys
    import torch
    from accelerate import Accelerator
    import stoker
    ds = stoker.load_dataset(sys.argv[1])
    workers = int(sys.argv[3])
    accelerator = Accelerator(cpu=True)
    plain = stoker.make_loader(ds, seed=7, shuffle=True, workers=workers, budget=2)
    alone = [[b["image_keys"] for b in plain] for _ in range(2)]
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = stoker.make_loader(ds, seed=7, shuffle=True, workers=workers, budget=2)
    model, optimizer, prepared = accelerator.prepare(model, optimizer, loader)
    through = [[b["image_keys"] for b in prepared] for _ in range(2)]
    with open(f"{sys.argv[2]}.{accelerator.process_index}", "w") as f:
        json.dump({"alone": alone, "prepared": through, "len": len(prepared),
                   "ranks": accelerator.num_processes, "type": type(prepared).__name__}, f)
    """
)


def _run_accelerate(script, sample, out, *, ranks: int, workers: int) -> list[dict]:
    env = launch.launch_env()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    launch.run(
        [*launch.launcher(ranks), str(script), str(sample.config), str(out), str(workers)],
        env=env,
        check=True,
    )
    return [json.loads(out.with_name(f"{out.name}.{r}").read_text()) for r in range(ranks)]


@pytest.mark.slow
@pytest.mark.torchrun
def test_accelerate_prepare_keeps_every_sample_on_two_ranks(sample, tmp_path):
    pytest.importorskip("accelerate")
    script = tmp_path / "train.py"
    script.write_text(ACCELERATE)
    results = _run_accelerate(script, sample, tmp_path / "keys.json", ranks=2, workers=1)
    total = load_dataset(sample.config).report.samples_per_epoch
    for result in results:
        assert result["ranks"] == 2 and result["type"] == "DataLoaderShard"
        # Each rank's epochs through accelerate are exactly its epochs without accelerate.
        assert result["prepared"] == result["alone"]
        assert result["len"] == len(result["alone"][0])
    for epoch in range(2):
        # Nothing lost, and nothing repeated beyond the padding of the last round (<= 1 batch).
        delivered = sum(len(b) for r in results for b in r["prepared"][epoch])
        assert total <= delivered <= total + 2
        paths = {k for r in results for b in r["prepared"][epoch] for k in b}
        assert len(paths) == 12  # every image of the sample dataset


@pytest.mark.slow
def test_accelerate_prepare_in_one_process_keeps_the_epoch(sample, tmp_path):
    pytest.importorskip("accelerate")
    script = tmp_path / "train.py"
    script.write_text(ACCELERATE)
    (result,) = _run_accelerate(script, sample, tmp_path / "keys.json", ranks=1, workers=0)
    assert result["ranks"] == 1
    assert result["prepared"] == result["alone"]
    delivered = sum(len(b) for b in result["prepared"][0])
    assert delivered == load_dataset(sample.config).report.samples_per_epoch


def test_a_loader_sharded_for_other_ranks_than_the_process_group_warns(sample):
    import torch.distributed as dist

    from stoker import StokerWarning

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{launch.free_port()}", rank=0, world_size=1
    )
    try:
        ds = load_dataset(sample.config)
        inside = make_loader(ds, seed=1, workers=0)  # takes its ranks from the running group
        assert (inside.rank_sampler.rank, inside.rank_sampler.world_size) == (0, 1)
        next(iter(inside))
        stale = make_loader(ds, seed=1, workers=0, rank=1, world_size=2)
        with pytest.warns(StokerWarning, match=r"made for rank 1 of 2, but torch.distributed"):
            next(iter(stale))
    finally:
        dist.destroy_process_group()


LIGHTNING = textwrap.dedent(
    """
    import json, sys
    import torch
    import lightning as L
    import stoker

    class Data(L.LightningDataModule):
        def train_dataloader(self):  # after the process group starts: stoker reads its ranks
            return stoker.make_loader(stoker.load_dataset(sys.argv[1]), seed=7, shuffle=True,
                                      workers=0)

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)
            self.seen = []
        def training_step(self, batch, index):
            self.seen.append(batch["image_keys"])
            return self.layer(torch.zeros(1, 2)).sum()
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    settings = {} if sys.argv[3] == "default" else {"use_distributed_sampler": False}
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, **settings)
    model = Model()
    result = {}
    try:
        trainer.fit(model, datamodule=Data())
        ds = stoker.load_dataset(sys.argv[1])
        alone = stoker.make_loader(ds, seed=7, shuffle=True, workers=0,
                                   rank=trainer.global_rank, world_size=2)
        result = {"seen": model.seen, "alone": [b["image_keys"] for b in alone]}
    except TypeError as err:
        result = {"error": str(err)}
    with open(f"{sys.argv[2]}.{trainer.global_rank}", "w") as f:
        json.dump(result, f)
    """
)


@pytest.mark.slow
@pytest.mark.torchrun
@pytest.mark.parametrize("mode", ["default", "use_distributed_sampler=False"])
def test_lightning_ddp_keeps_every_sample_or_says_what_to_do(sample, tmp_path, mode):
    pytest.importorskip("lightning")
    script = tmp_path / "fit.py"
    script.write_text(LIGHTNING)
    out = tmp_path / "seen.json"
    launch.run(
        [*launch.launcher(1), str(script), str(sample.config), str(out), mode.split("=")[0]],
        env=launch.launch_env(),
        check=True,
        cwd=tmp_path,
    )
    results = [json.loads(out.with_name(f"{out.name}.{r}").read_text()) for r in range(2)]
    if mode == "default":
        # Lightning refuses at once, before any step, and names the fix.
        for result in results:
            assert "use_distributed_sampler=False" in result["error"]
        return
    for result in results:
        assert result["seen"] == result["alone"]  # exactly stoker's shard for that rank
    delivered = sum(len(b) for r in results for b in r["seen"])
    assert delivered >= load_dataset(sample.config).report.samples_per_epoch
