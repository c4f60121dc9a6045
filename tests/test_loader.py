from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from stoker import StokerLoader, StokerWarning, make_loader


class RandomDraws(Dataset):
    """Each item draws from the worker's global random states, so it shows the worker seeding."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        import random

        return torch.tensor(
            [index, random.random(), float(np.random.rand()), torch.rand(1).item()],
            dtype=torch.float64,
        )


def collect(loader) -> torch.Tensor:
    return torch.cat([batch for batch in loader])


def test_returns_a_real_dataloader_with_its_plan():
    loader = make_loader(range(10), batch_size=4, workers=0, budget=2, seed=1)
    assert isinstance(loader, DataLoader) and isinstance(loader, StokerLoader)
    assert loader.plan.num_workers == 0 and loader.seed == 1
    assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_dataloader_names_are_accepted_as_aliases():
    with pytest.warns(StokerWarning, match="persistent workers need at least one worker"):
        loader = make_loader(range(4), num_workers=0, persistent_workers=True, budget=2)
    assert loader.num_workers == 0 and loader.persistent_workers is False
    with pytest.raises(ValueError, match="either workers= or num_workers="):
        make_loader(range(4), workers=1, num_workers=1, budget=2)


def test_seed_is_drawn_and_kept_when_not_given():
    a = make_loader(range(4), workers=0, budget=1)
    b = make_loader(range(4), workers=0, budget=1)
    assert isinstance(a.seed, int) and a.seed != b.seed


@pytest.mark.slow
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_worker_seeds_follow_the_seed(start_method):
    def run(seed):
        loader = make_loader(
            RandomDraws(),
            batch_size=2,
            shuffle=True,
            workers=2,
            seed=seed,
            budget=2,
            start_method=start_method,
            persistent=False,
        )
        return collect(loader)

    first, again, other = run(7), run(7), run(8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # workers are seeded differently from each other
    assert len({round(float(x), 12) for x in first[:, 1]}) == 8


@pytest.mark.slow
def test_user_worker_init_fn_still_runs():
    loader = make_loader(
        RandomDraws(),
        batch_size=8,
        workers=1,
        budget=2,
        seed=0,
        worker_init_fn=_set_marker,
        persistent=False,
    )
    batch = next(iter(loader))
    assert batch.shape == (8, 4)


def _set_marker(worker_id: int) -> None:
    import random

    random.seed(1234 + worker_id)


SEED_CRASH = textwrap.dedent(
    """
    import json, warnings
    import stoker
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = stoker.make_loader(list(range(10)), batch_size=3, workers=8, persistent=True,
                                    prefetch_factor=2)
        epochs = [[int(x) for b in loader for x in b] for _ in range(2)]
        stoker.make_loader(list(range(10)), workers=8, persistent=True, prefetch_factor=2)
    told = [str(w.message) for w in caught if issubclass(w.category, stoker.StokerWarning)]
    print(json.dumps({"cpus": loader.plan.budget.cpus, "workers": loader.num_workers,
                      "epochs": epochs, "told": told}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset is not installed")
def test_seed_crash_is_gone_on_one_cpu():
    # sd-scripts' pattern: workers=8 and persistent_workers=True on a 1-CPU machine crashed.
    out = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", SEED_CRASH],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result = json.loads(out.stdout)
    assert result["cpus"] == 1 and result["workers"] == 0
    assert result["epochs"] == [list(range(10))] * 2
    # three changes (workers, persistent, prefetch), each told once across two loaders
    assert len(result["told"]) == 3
    assert any("changed persistent from True to False" in t for t in result["told"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset is not installed")
def test_doctor_under_taskset_reports_affinity():
    out = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-m", "stoker.cli", "doctor", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    report = json.loads(out.stdout)
    assert report["cpus"] == 1 and report["source"] == "CPU affinity 1 CPU"


def test_no_warning_when_nothing_changes():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_loader(range(4), workers=0, budget=1, seed=0)


SPAWN_BREAK = textwrap.dedent(
    """
    import sys
    import stoker
    from stoker.data.synthetic import write_sample_dataset

    if __name__ == "__main__":
        sample = write_sample_dataset(sys.argv[1], images=8)
        dataset = stoker.load_dataset(sample.config)
        for _ in range(2):
            loader = stoker.make_loader(dataset, seed=0, workers=2, budget=2,
                                        start_method="spawn", persistent=False)
            for i, batch in enumerate(loader):
                if i == 2:
                    break  # leave mid-epoch while workers are still busy
            del loader
        print("finished")
    """
)


@pytest.mark.slow
def test_leaving_a_spawn_loader_mid_epoch_stops_workers_cleanly(tmp_path):
    # torch 2.13 aborts spawned workers stopped mid-batch; the loader lets them go idle first.
    script = tmp_path / "leave.py"
    script.write_text(SPAWN_BREAK)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "finished"
    assert "terminate called" not in out.stderr and "Aborted" not in out.stderr, out.stderr
