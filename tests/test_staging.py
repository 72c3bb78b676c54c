"""Atomic output directories: complete-or-nothing, replace only on success, normal permissions."""

import os

import pytest

from jetspec_trt.errors import JetSpecError
from jetspec_trt.staging import staged_directory


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_success_replaces_the_output_with_normal_permissions(tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staged_directory(out, overwrite=True) as staging:
        assert staging.parent == tmp_path and staging != out
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask()  # not mkdtemp's 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]  # no staging or retired dirs left


def test_failure_leaves_the_old_output_and_no_staging(tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_directory(out, overwrite=True) as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("build failed")
    assert [p.name for p in tmp_path.iterdir()] == ["engine"] and (out / "old.txt").read_text() == "old"


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    with pytest.raises(JetSpecError, match="already exists"):
        with staged_directory(out, overwrite=False):
            pass
    with staged_directory(tmp_path / "a" / "b", overwrite=False) as staging:  # parents are made
        (staging / "x").write_text("x")
    assert (tmp_path / "a" / "b" / "x").is_file()
