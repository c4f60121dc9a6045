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


# --- what a new user meets (issue 12) ------------------------------------------------------------


def _folder_dataset(root, *, captions=".txt", empty_subset=True, reg=True):
    """A train_data_dir as people have them: .txt captions, maybe an empty subset, a reg folder."""
    from PIL import Image

    train = root / "train"
    (train / "5_sks dog").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (640, 480), (i * 40, 0, 0)).save(train / "5_sks dog" / f"im{i}.jpg")
        (train / "5_sks dog" / f"im{i}{captions}").write_text("a photo of sks dog, red")
    if empty_subset:
        (train / "3_empty").mkdir()
    if reg:
        (root / "reg" / "1_dog").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (512, 512)).save(root / "reg" / "1_dog" / f"r{i}.png")
    return train


def test_scan_of_a_folder_flags_ignored_captions_and_names_the_flag(tmp_path, capsys):
    train = _folder_dataset(tmp_path, empty_subset=False, reg=False)
    assert main(["scan", str(train), "--resolution", "512"]) == 1
    out = capsys.readouterr().out
    assert "4 .txt caption files are not read: captions are read from .caption files" in out
    assert "use --caption-extension .txt" in out
    assert "4 of 4 images have no .caption file; they are captioned with the class tokens" in out
    assert "No problems found." not in out


def test_folder_source_options_reach_load_dataset(tmp_path, capsys):
    train = _folder_dataset(tmp_path, empty_subset=False, reg=False)
    args = ["scan", str(train), "--resolution", "512", "--caption-extension", "txt"]
    more = ["--enable-bucket", "--batch-size", "2", "--min-bucket-reso", "256"]
    assert main([*args, *more, "--set", "keep_tokens=1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["findings"] == [] and report["batches_per_epoch"] == 10  # 20 samples / 2
    # Buckets: 640x480 images land in a landscape bucket, not in one 512x512 square.
    assert {(b["width"], b["height"]) for b in report["buckets"][0]["buckets"]} != {(512, 512)}


def test_scan_flags_an_empty_subset_and_explains_reg_balancing(tmp_path, capsys):
    train = _folder_dataset(tmp_path)
    args = ["scan", str(train), "--resolution", "512", "--caption-extension", ".txt"]
    assert main([*args, "--reg-data-dir", str(tmp_path / "reg")]) == 1
    out = capsys.readouterr().out
    assert "3_empty: no images, so its num_repeats = 3 adds nothing" in out
    reg_line = next(line for line in out.splitlines() if line.lstrip().startswith("reg"))
    assert "2 images x1" in reg_line and "20 samples" in reg_line
    assert "balanced: as sd-scripts does, regularisation images are repeated to match" in reg_line


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], "give --resolution (e.g. 512)"),
        (["--resolution", "512", "--batch-size", "0"], "--batch-size = 0 is too small"),
        (["--resolution", "512", "--set", "keep_tokens"], "--set 'keep_tokens' is not valid"),
        (["--resolution", "512", "--set", "nope=3"], "unknown key 'nope'"),
    ],
)
def test_folder_source_errors_name_the_flag(tmp_path, capsys, extra, expected):
    train = _folder_dataset(tmp_path, empty_subset=False, reg=False)
    assert main(["scan", str(train), *extra]) in (1, 2)
    err = capsys.readouterr().err
    assert err.startswith("stoker: error: ") and expected in err
    assert "resolution=" not in err and "Traceback" not in err


def test_scan_of_an_image_says_it_is_an_image(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "img.jpg")
    assert main(["scan", str(tmp_path / "img.jpg")]) == 1
    err = capsys.readouterr().err
    assert "img.jpg is an image; give the train_data_dir that holds" in err
    assert "metadata:" not in err


def test_skipped_folder_is_said_once(tmp_path, capsys):
    train = _folder_dataset(tmp_path, empty_subset=False, reg=False)
    (train / "notes").mkdir()
    assert main(["scan", str(train), "--resolution", "512", "--caption-extension", ".txt"]) == 0
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("notes") == 1


def test_plurals_and_a_readable_report(tmp_path, capsys):
    import stoker

    train = _folder_dataset(tmp_path, empty_subset=False, reg=False)
    for extra in ("im1", "im2", "im3"):
        (train / "5_sks dog" / f"{extra}.jpg").unlink()
    assert main(["scan", str(train), "--resolution", "512", "--caption-extension", ".txt"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1 image, 5 samples per epoch")
    assert "1 images" not in out and "1 image  x5" in out
    report = str(stoker.load_dataset(train, resolution=512, caption_extension=".txt").report)
    assert report.splitlines()[1] == "Subsets:" and max(map(len, report.splitlines())) < 200


def test_cpu_counts_of_one_are_singular(capsys, monkeypatch):
    monkeypatch.setenv("STOKER_CPUS", "1")
    assert main(["doctor", "--workers", "3"]) == 0
    out = capsys.readouterr().out
    assert "CPU budget: 1 CPU for this process" in out and "1 CPUs" not in out


def test_help_texts_are_plain(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "tuning its workers live" in out and "%%" not in out
    assert "do not remember this one" in out
    with pytest.raises(SystemExit):
        main(["doctor", "--help"])
    assert "how worker processes start" in " ".join(capsys.readouterr().out.split())


def test_demo_refuses_a_file_and_an_unwritable_folder(tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("keep me")
    assert main(["demo", "--out", str(mine)]) == 1
    assert "is a file; give a folder" in capsys.readouterr().err
    assert mine.read_text() == "keep me"
    assert main(["demo", "--out", "/proc/nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("stoker: error: --out /proc/nope: could not write the sample dataset")
    assert "Traceback" not in err


def test_file_system_errors_are_one_line(monkeypatch, capsys, tmp_path):
    import stoker

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/data/train/5_x")

    monkeypatch.setattr(stoker, "load_dataset", denied)
    assert main(["scan", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "stoker: error: /data/train/5_x: Permission denied\n"


def test_make_loader_rejects_a_seed_that_is_not_a_number(tmp_path):
    from stoker import load_dataset, make_loader
    from stoker.data.synthetic import write_sample_dataset

    sample = write_sample_dataset(tmp_path / "s", images=4)
    with pytest.raises(ValueError, match=r"seed='1' is not valid: use a whole number"):
        make_loader(load_dataset(sample.config), seed="1", workers=0)


def test_readme_first_example_warns_once(tmp_path, monkeypatch):
    import stoker
    from stoker.data.synthetic import write_sample_dataset

    monkeypatch.setenv("STOKER_CPUS", "1")
    monkeypatch.setattr("stoker.planning.cuda_available", lambda: False)
    sample = write_sample_dataset(tmp_path / "s", images=4)
    dataset = stoker.load_dataset(sample.config)
    with pytest.warns(stoker.StokerWarning) as told:
        loader = stoker.make_loader(dataset, shuffle=True, workers=8, seed=42)
    assert [str(w.message)[:41] for w in told] == ["stoker changed workers from 8 to 0: the C"]
    assert loader.num_workers == 0


def test_tune_cache_key_does_not_depend_on_how_the_path_is_spelled(tmp_path, monkeypatch):
    from stoker import load_dataset
    from stoker.data.synthetic import write_sample_dataset

    def dataset_fingerprint(dataset):
        return dataset.fingerprint()

    sample = write_sample_dataset(tmp_path / "s", images=4)
    monkeypatch.chdir(tmp_path)
    relative = dataset_fingerprint(load_dataset("s/dataset.toml"))
    absolute = dataset_fingerprint(load_dataset(sample.config.resolve()))
    assert relative == absolute is not None
    other = write_sample_dataset(tmp_path / "t", images=5)
    assert dataset_fingerprint(load_dataset(other.config)) != absolute


@pytest.mark.slow
def test_demo_with_auto_workers_prints_the_plan_it_loads_with(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert main(["demo", "--out", str(out_dir), "--images", "4", "--workers", "auto"]) == 0
    out = capsys.readouterr().out
    (planned,) = [line for line in out.splitlines() if line.strip().startswith("num_workers =")]
    chosen = next(line for line in out.splitlines() if line.strip().startswith("workers = "))
    # One plan, the loader's own: what it printed is what was measured and used.
    assert planned.split("=")[1].strip() == chosen.split("=")[1].split(":")[0].strip()
    assert "measured" in chosen
    # Running the demo again into its own folder is allowed.
    assert main(["demo", "--out", str(out_dir), "--images", "4", "--workers", "0"]) == 0


@pytest.mark.slow
def test_tune_without_cache_does_not_promise_reuse(tmp_path, capsys, monkeypatch):
    from stoker.data.synthetic import write_sample_dataset

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    sample = write_sample_dataset(tmp_path / "s", images=4, resolution=256)
    assert main(["tune", str(sample.config), "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "reuses this choice" not in out and "measures again" in out
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_the_installed_console_script_gives_one_line_errors(tmp_path):
    import os
    import shutil
    import subprocess
    from pathlib import Path

    script = shutil.which("stoker")
    # make test installs this checkout (pip install -e .), console script included.
    assert script is not None, "the stoker console script is not installed: run pip install -e ."
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src)}  # this checkout's code behind the real script
    for args, expected in [
        (["scan", str(tmp_path / "missing.toml")], "missing.toml does not exist"),
        (["demo", "--out", "/proc/nope"], "--out /proc/nope: could not write"),
        (["bench", str(tmp_path), "--plot", "/nonexistent_dir/x.png"], "does not exist"),
    ]:
        done = subprocess.run([script, *args], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("stoker: error: ") and expected in done.stderr
        assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


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
