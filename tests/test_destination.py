"""`--out` of the exports never destroys a user's files, and a package is replaced whole or not at all."""

import shutil
import subprocess
import sys

import pytest

from export.destination import UsageError, check_out, install
from helpers import ROOT
from runtime import DEFAULT_MODEL
from runtime.engine import BUNDLED
from runtime.manifest import load_manifest


def export(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("command", [["package"], ["quantize", DEFAULT_MODEL, "--precision", "int8"],
                                     ["hf", DEFAULT_MODEL]])
def test_a_folder_that_is_not_a_package_is_refused_untouched(tmp_path, command):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"\xff\xd8 a user's photo")
    r = export(*command, "--out", photos)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "not a model package" in r.stderr and "holiday.jpg" in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["photos"] and (photos / "holiday.jpg").read_bytes() == b"\xff\xd8 a user's photo"


def test_a_file_or_a_package_holding_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="exists and is not a folder"):
        check_out(tmp_path / "notes.txt")
    package = tmp_path / "pkg"
    shutil.copytree(DEFAULT_MODEL, package)
    (package / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="also holds notes.txt"):
        check_out(package)
    (package / "notes.txt").unlink()
    check_out(package)  # a package of ours, and nothing else: may be replaced
    check_out(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty")


def test_a_package_is_replaced_whole_and_an_interrupted_install_leaves_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "pkg"
    shutil.copytree(DEFAULT_MODEL, out)
    new = BUNDLED["int8"]
    copied, copy = [], shutil.copyfile

    def copy_then_die(src, dst):
        if copied:
            raise KeyboardInterrupt  # killed part-way through writing the new package
        copied.append(copy(src, dst))

    monkeypatch.setattr("export.destination.shutil.copyfile", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        install(new, out)
    assert load_manifest(out).data["precision"] == "fp32"  # the previous package, whole
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]  # no staging left behind
    monkeypatch.undo()
    install(new, out)
    assert load_manifest(out).data["precision"] == "int8"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in new.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]
