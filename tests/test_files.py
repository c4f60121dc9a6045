"""The one atomic writer: no half-written file, no write through a planted symlink."""

from __future__ import annotations

import os

import pytest

from stoker.files import atomic_write_bytes, atomic_write_text


def test_an_interrupted_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    atomic_write_text(target, "old")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    victim.chmod(0o600)
    target = tmp_path / "cache.json"
    target.symlink_to(victim)
    atomic_write_bytes(target, b"cache")
    assert victim.read_text() == "precious"
    assert not target.is_symlink() and target.read_bytes() == b"cache"


def test_planted_temp_names_cannot_redirect_the_write(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    # Plant symlinks under every name an older, predictable writer would have used.
    for name in (f"cache.json.{os.getpid()}.tmp", ".cache.json.tmp", "cache.json.tmp"):
        (tmp_path / name).symlink_to(victim)
    atomic_write_text(tmp_path / "cache.json", "new")
    assert victim.read_text() == "precious"
    assert (tmp_path / "cache.json").read_text() == "new"


def test_the_written_file_gets_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644
