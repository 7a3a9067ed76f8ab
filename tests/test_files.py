"""blip2.files: a write either lands whole or leaves the target as it was, with no temporary left behind."""

import pytest

from blip2.files import atomic_dir, atomic_file, write_text_atomic


def test_atomic_file_replaces_or_keeps(tmp_path):
    target = tmp_path / "sub" / "a.json"
    write_text_atomic(target, "one")
    assert target.read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("two")
            raise RuntimeError("interrupted")
    assert target.read_text() == "one"
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_atomic_dir_replaces_an_existing_directory(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "old.txt").write_text("x")
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("y")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_atomic_dir_keep_existing_keeps_the_winner(tmp_path):
    target = tmp_path / "wheel"
    with atomic_dir(target, keep_existing=True) as tmp:
        (tmp / "mine").write_text("a")
        target.mkdir()  # another process finished first
        (target / "theirs").write_text("b")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["wheel"]
