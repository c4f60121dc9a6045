"""benchmarks/vs_sd_scripts.py: the pure parts (rows, medians, ratios, the same-work checks) and
its exit without sd-scripts. The comparison itself runs only by hand (it needs sd-scripts)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_sd_scripts.py"


@pytest.fixture(scope="module")
def bench() -> Any:
    spec = importlib.util.spec_from_file_location("vs_sd_scripts", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tool: str, workers: Any, images: int, seconds: float, **extra: Any) -> dict[str, Any]:
    """A run of two epochs; its last epoch served half the images in 40% of the time."""
    setting = {"tool": tool, "workers": workers, "batch_size": 1, **extra}
    return {
        "setting": setting,
        "images": images,
        "seconds": seconds,
        "epoch_images": [images - images // 2, images // 2],
        "epoch_seconds": [seconds * 0.6, seconds * 0.4],
        "workers_used": workers,
    }


def test_every_setting_has_its_own_row(bench: Any) -> None:
    labels = [bench.setting_label(s) for s in bench.settings_for(1)]
    assert len(labels) == len(set(labels))
    assert "sd-scripts, default workers" in labels
    assert "sd-scripts, 2 workers" in labels
    assert "stoker, no worker count (default), float" in labels
    assert 'stoker, workers="auto", float' in labels
    assert "stoker, 2 workers, uint8" in labels


def test_medians_and_the_two_targets(bench: Any) -> None:
    runs = [
        _run("sd-scripts", "default", 120, 4.0),  # 30 images/s
        _run("sd-scripts", "default", 120, 3.0),  # 40
        _run("sd-scripts", "default", 120, 2.0),  # 60: median 40
        _run("sd-scripts", 2, 120, 3.0),  # 40
        _run("stoker", 2, 120, 1.5, output="float"),  # 80
        _run("stoker", 2, 120, 1.6, output="uint8"),  # 75
        _run("stoker", None, 120, 2.4, output="float"),  # 50
    ]
    summary = bench.summarize(runs)
    assert summary["sd-scripts, default workers"]["images_per_second"] == pytest.approx(40.0)
    assert summary["sd-scripts, default workers"]["runs"] == pytest.approx([30.0, 40.0, 60.0])
    last = summary["sd-scripts, default workers"]["last_epoch_images_per_second"]
    assert last == pytest.approx(40.0 * 0.5 / 0.4)
    found = {(r["issue"], r["stoker"]): r for r in bench.ratios(summary)}
    assert found[("#11", "stoker, 2 workers, float")]["ratio"] == pytest.approx(2.0)
    assert found[("#11", "stoker, 2 workers, float")]["met"]
    assert not found[("#11", "stoker, 2 workers, uint8")]["met"]  # 75 / 40 = 1.875
    default = found[("#13", "stoker, no worker count (default), float")]
    assert default["ratio"] == pytest.approx(1.25) and not default["met"]
    # rows that were not measured give no ratio, rather than a made-up one
    assert ("#13", 'stoker, workers="auto", float') not in found
    lines = "\n".join(bench.format_table(summary, bench.ratios(summary)))
    assert "x2.00 (last epoch x2.00)  target >= x2.0: met" in lines
    assert "x1.25 (last epoch x1.25)  target >= x1.3: NOT met" in lines


def test_same_work_names_the_files_that_differ(bench: Any) -> None:
    sd = {"a.jpg": [1024, 1024, 1024, 1024], "b.jpg": [1152, 896, 1192, 896]}
    same = {"a.jpg": [1024, 1024, 1024, 1024], "b.jpg": [1152, 896, 1192, 896]}
    other = {"a.jpg": [1024, 1024, 1024, 1024], "b.jpg": [1152, 896, 1190, 896]}
    assert bench.work_differences({"sd": sd, "stoker": same}) == {}
    differences = bench.work_differences({"sd": sd, "stoker": same, "bad": other})
    assert differences == {"bad": {"missing": [], "bucket": [], "resized": ["b.jpg"]}}
    fewer = bench.work_differences({"sd": sd, "few": {"a.jpg": sd["a.jpg"]}})
    assert fewer == {"few": {"missing": ["b.jpg"], "bucket": [], "resized": []}}


def test_served_images_are_checked_against_the_buckets(bench: Any) -> None:
    assigned = {"a.jpg": [1152, 896, 1192, 896], "b.jpg": [1024, 1024, 1024, 1024]}
    good = _run("stoker", 0, 4, 1.0, output="float")
    good.update(assignments=assigned, shapes={"896x1152": 3, "1024x1024": 1})
    assert bench.served_problems([good], epochs=2) == []
    bad = _run("sd-scripts", 0, 3, 1.0)
    bad.update(assignments=assigned, shapes={"1152x896": 3})  # transposed, and one short
    problems = bench.served_problems([bad], epochs=2)
    assert len(problems) == 2
    assert "3 images, not 2 x 2" in problems[0]
    assert "1152x896" in problems[1]
    larger = _run("sd-scripts", 0, 9, 1.0)
    larger["setting"]["batch_size"] = 4  # sd-scripts' own reshuffle may change its count here
    larger.update(assignments=assigned, shapes={"1024x1024": 9})
    assert bench.served_problems([larger], epochs=2) == []


def test_byte_alphabet_covers_every_byte_once(bench: Any) -> None:
    alphabet = bench._byte_alphabet()
    assert len(alphabet) == len(set(alphabet)) == 256
    assert alphabet[ord("a")] == "a"
    assert alphabet[ord(" ")] == chr(256 + 32)  # space is not printable: moved


def test_without_sd_scripts_it_says_so_and_exits_0(tmp_path: Path) -> None:
    for extra in ([], ["--sd-scripts", str(tmp_path)]):
        done = subprocess.run(
            [sys.executable, str(SCRIPT), *extra], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        assert "vs_sd_scripts: skipped:" in done.stdout


def test_the_run_interleaves_settings_and_writes_its_json(
    bench: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The parent's loop with children that report made-up figures (no sd-scripts here)."""
    assigned = {"img_0000.jpg": [1152, 896, 1192, 896]}
    calls: list[dict[str, Any]] = []

    def child(spec: dict[str, Any]) -> dict[str, Any]:
        calls.append(spec)
        rate = 10.0 if spec["tool"] == "sd-scripts" else 25.0
        images = spec["epochs"] * len(assigned)
        return {
            "images": images,
            "seconds": images / rate,
            "epoch_images": [len(assigned)] * spec["epochs"],
            "epoch_seconds": [len(assigned) / rate] * spec["epochs"],
            "shapes": {"896x1152": 1},
            "assignments": assigned,
            "workers_used": 2 if spec["workers"] in ("default", None, "auto") else spec["workers"],
            "first_batch": {},
        }

    monkeypatch.setattr(bench, "OUT", tmp_path)
    monkeypatch.setattr(bench, "run_child", child)
    probe = {"max_data_loader_n_workers": 8, "persistent_data_loader_workers": False}
    probe.update(cache_latents=False, adapted=[], os_cpu_count=2, affinity_cpus=2)
    out = tmp_path / "result.json"
    args = bench._parse(["--images", "1", "--epochs", "2", "--rounds", "2", "--out", str(out)])
    assert bench.compare(args, {"sd_scripts": str(tmp_path), "deps": None}, probe) == 0

    settings = bench.settings_for(1)
    assert [bench.setting_label(c) for c in calls] == [bench.setting_label(s) for s in settings] * 2
    result = json.loads(out.read_text())
    assert result["sd_scripts_default_workers"] == 2
    table = result["by_batch_size"]["1"]
    assert table["same_work"]
    assert [r["ratio"] for r in table["ratios"]] == pytest.approx([2.5] * 5)
    printed = capsys.readouterr().out
    assert "same work: 1 images; every setting assigns each the same bucket" in printed
    assert "target >= x1.3: met" in printed


def test_quick_shortens_only_what_was_not_given(bench: Any) -> None:
    full = bench._parse([])
    assert (full.images, full.epochs, full.rounds) == (40, 3, 3)
    quick = bench._parse(["--quick", "--epochs", "2"])
    assert (quick.images, quick.epochs, quick.rounds) == (12, 2, 1)
