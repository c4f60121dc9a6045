from __future__ import annotations

import json

import pytest

from stoker.cli import main


def test_doctor_prints_budget_limits_and_plan(capsys, monkeypatch):
    monkeypatch.setenv("STOKER_CPUS", "3")
    assert main(["doctor", "--workers", "8", "--persistent"]) == 0
    out = capsys.readouterr().out
    assert "CPU budget: 3 CPUs for this process (STOKER_CPUS=3 (override))" in out
    assert "override" in out and "limits checked:" in out
    assert "workers: 8 -> 3: only 3 CPUs are available" in out
    assert "Recommended:" in out and "num_workers=3" in out


def test_doctor_json_has_the_promised_keys(capsys, monkeypatch):
    monkeypatch.setenv("STOKER_CPUS", "1")
    assert (
        main(["doctor", "--workers", "4", "--persistent", "--prefetch-factor", "4", "--json"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert {"cpus", "source", "limits", "plan", "adjustments"} <= set(report)
    assert report["cpus"] == 1
    assert report["plan"]["num_workers"] == 0 and report["plan"]["persistent_workers"] is False
    settings = {a["setting"] for a in report["adjustments"]}
    assert settings == {"workers", "persistent", "prefetch_factor"}
    assert all(a["reason"] for a in report["adjustments"])


def test_doctor_bad_value_is_one_line_and_exit_2(capsys):
    assert main(["doctor", "--workers", "eight"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "stoker: error: workers='eight' is not valid: use a whole number >= 0 (0 loads in the "
        "main process), 'auto' to measure, or None for the default from the CPU budget"
    )


def test_bad_stoker_cpus_is_one_line_and_exit_1(capsys, monkeypatch):
    monkeypatch.setenv("STOKER_CPUS", "lots")
    assert main(["doctor"]) == 1
    assert capsys.readouterr().err.startswith("stoker: error: STOKER_CPUS='lots'")


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["doctor", "--prefetch-factor", "x"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_demo_writes_and_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STOKER_CPUS", "1")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--images", "8"]) == 0
    out = capsys.readouterr().out
    assert "Wrote a sample dataset of 8 images" in out
    assert "epoch 1:" in out and "Loaded" in out


def test_scan_reports_counts_buckets_and_problems(tmp_path, capsys):
    from stoker.data.synthetic import write_sample_dataset

    sample = write_sample_dataset(tmp_path / "s", images=8)
    (sample.train_data_dir / "10_sks dog" / "broken.jpg").write_bytes(b"")
    assert main(["scan", str(sample.config)]) == 1
    out = capsys.readouterr().out
    assert "8 images" in out and "Buckets of dataset 1" in out
    assert "broken.jpg: zero-byte file [skipped]" in out
    assert main(["scan", str(sample.config), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 8 and len(report["problems"]) == 1
    assert report["subsets"][0]["num_repeats"] == 10


def test_scan_of_a_clean_dataset_exits_0(tmp_path, capsys):
    from stoker.data.synthetic import write_sample_dataset

    sample = write_sample_dataset(tmp_path / "s", images=4)
    assert main(["scan", str(sample.train_data_dir), "--resolution", "256"]) == 0
    assert "No problems found." in capsys.readouterr().out


def test_scan_names_a_config_error(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(
        "[[datasets]]\nresolution = 512\nbatchsize = 2\n[[datasets.subsets]]\nimage_dir = '.'\n"
    )
    assert main(["scan", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("stoker: error: ") and "batchsize" in err and "batch_size" in err


def test_demo_never_overwrites_a_users_files(tmp_path, capsys):
    from stoker.cli import main

    (tmp_path / "dataset.toml").write_text("# my own config\n")
    assert main(["demo", "--out", str(tmp_path), "--images", "4", "--workers", "0"]) == 2
    assert (tmp_path / "dataset.toml").read_text() == "# my own config\n"
    assert "would overwrite (dataset.toml)" in capsys.readouterr().err
    assert not (tmp_path / "train").exists()  # nothing written at all


def test_demo_can_be_run_again_into_its_own_folder(tmp_path):
    from stoker.data.synthetic import write_sample_dataset

    first = write_sample_dataset(tmp_path / "demo", images=4)
    again = write_sample_dataset(tmp_path / "demo", images=4)  # same bytes: nothing to refuse
    assert again.config.read_bytes() == first.config.read_bytes()
