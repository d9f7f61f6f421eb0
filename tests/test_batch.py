"""python -m runtime.batch on local Ray with this machine's 2 CPUs: one row per input, captions equal
the CLI's, bad files as rows with their error, and a job killed part-way then rerun ends with every
input exactly once. Every job runs in its own process group with its own Ray temp folder, and the
group is killed at the end whatever happened."""

import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import ROOT, caption_without_torch
from runtime.batch import PART, BatchError, actor_resources, apply_options, list_inputs, written

BAD = {"junk.jpg": b"not an image", "empty.png": b"", "page.gif": b"<html><body>moved</body></html>",
       "strip.png": None, "cut.jpg": None}


@pytest.fixture(scope="module")
def library(tmp_path_factory, photo_paths) -> Path:
    """300 generated images (some in a subfolder) and 5 bad files."""
    root = tmp_path_factory.mktemp("library")
    (root / "sub").mkdir()
    rng = np.random.default_rng(0)
    for i in range(300):
        h, w = rng.integers(48, 160, 2)
        y, x = np.mgrid[0:h, 0:w]
        k = rng.integers(1, 6, 3)
        pixels = np.stack([x * k[0] % 256, y * k[1] % 256, (x + y) * k[2] % 256], -1).astype(np.uint8)
        Image.fromarray(pixels).save(root / ("sub" if i % 10 == 0 else ".") / f"g{i:03d}.png")
    for name, data in BAD.items():
        (root / name).write_bytes(data if data is not None else b"")
    Image.new("RGB", (400, 4)).save(root / "strip.png")  # aspect ratio 100:1
    (root / "cut.jpg").write_bytes(photo_paths["chelsea"].read_bytes()[:2000])
    return root


@contextmanager
def job(out: Path, *args, input_path: Path):
    """The batch job as a process group of its own (driver, Ray's local cluster, actors)."""
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen([sys.executable, "-m", "runtime.batch", str(input_path), "--out", str(out), *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def finish(proc) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def rows(out: Path) -> list[dict]:
    return pads.dataset(str(out), format="parquet").to_table().to_pylist()


def test_every_input_once_with_the_clis_captions_and_errors(library, tmp_path):
    out = tmp_path / "captions"
    with job(out, input_path=library) as proc:
        code, err = finish(proc)
    assert code == 1, err  # five rows carry errors
    assert err.splitlines()[-1].startswith("305 images captioned (5 errors) in ") and \
        err.splitlines()[-1].endswith(f"; 0 already in {out}; 305 rows there, 5 with errors")
    got = {r["path"]: r for r in rows(out)}
    assert len(got) == len(rows(out)) == 305
    cli = caption_without_torch(library, library / "sub", "--json")
    expected = {r["image"]: r for r in map(json.loads, cli.stdout.splitlines())}
    assert set(got) == set(expected)
    for path, r in got.items():
        want = expected[path]
        assert (r["caption"], r["error"]) == (want.get("caption"), want.get("error")), path
        assert r["tokens"] == want.get("tokens", [])
        assert r["model"] == "efficientnet-lite0-concept-captioner" and r["precision"] == "int8"
    assert {Path(p).name for p, r in got.items() if r["error"]} == set(BAD)

    with job(out, input_path=library) as proc:  # a rerun has nothing left to do
        code, err = finish(proc)
    assert code == 1 and err.splitlines()[-1].startswith("0 images captioned (0 errors)")
    assert len(rows(out)) == 305


def test_a_killed_job_rerun_gives_every_input_exactly_once(library, tmp_path):
    out = tmp_path / "captions"
    with job(out, "--actors", "2", input_path=library) as proc:
        deadline = time.monotonic() + 240
        while not list(out.glob("*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, the local cluster and the actors
    assert 0 < len(rows(out)) < 305, "the job was not interrupted part-way"
    with job(out, "--actors", "2", input_path=library) as proc:
        code, err = finish(proc)
    assert code == 1, err
    paths = [r["path"] for r in rows(out)]
    assert len(paths) == len(set(paths)) == 305
    assert all(PART.fullmatch(p.name) for p in out.iterdir())  # named as its own: a rerun may redo them


OURS = "edgecap-0123abcd_000001-0.parquet"  # a part as runtime.batch names its own


def test_parts_of_ours_cut_short_by_a_kill_are_dropped_and_redone(tmp_path):
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg"], "caption": ["x", "y"]}), tmp_path / "whole.parquet")
    pq.write_table(pa.table({"path": ["c.jpg"], "caption": ["z"]}), tmp_path / OURS)
    data = (tmp_path / OURS).read_bytes()
    (tmp_path / OURS).write_bytes(data[: len(data) - 20])  # no footer: the writer was killed
    assert written(tmp_path) == {("a.jpg", None, None, None), ("b.jpg", None, None, None)}  # asking nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whole.parquet"]


@pytest.mark.parametrize("name, damage", [("other-tool.parquet", "cut"),  # not ours: never deleted
                                          (OURS, "middle")])  # ours, footer present, unreadable otherwise
def test_an_unreadable_file_stops_the_run_and_nothing_is_deleted(tmp_path, name, damage):
    out, images = tmp_path / "out", tmp_path / "in"
    out.mkdir()
    images.mkdir()
    Image.new("RGB", (64, 48)).save(images / "a.png")
    pq.write_table(pa.table({"path": ["c.jpg"] * 50, "caption": ["z"] * 50}), out / name)
    data = (out / name).read_bytes()
    damaged = data[:-20] if damage == "cut" else data[:4] + bytes(len(data) - 12) + data[-8:]
    (out / name).write_bytes(damaged)
    pq.write_table(pa.table({"path": ["d.jpg"]}), out / OURS.replace("1-0.", "2-0."))
    (out / OURS.replace("1-0.", "3-0.")).write_bytes(b"PAR1 cut")  # ours and cut short: deleted only if the run goes on
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(BatchError, match=f"{name}: cannot be read"):
        written(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = subprocess.run([sys.executable, "-m", "runtime.batch", str(images), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {out / name}: cannot be read"), r.stderr
    assert len(r.stderr.splitlines()) == 1 and {p.name: p.read_bytes() for p in out.iterdir()} == before


def paths(rows: list[dict]) -> list[str]:
    return [r["path"] for r in rows]


def test_inputs_from_a_folder_a_glob_a_csv_or_parquet(library, tmp_path):
    in_folder = paths(list_inputs(str(library)))
    assert len(in_folder) == 305 and str(library / "sub" / "g000.png") in in_folder
    assert paths(list_inputs(str(library / "sub" / "*.png"))) == sorted(str(p) for p in (library / "sub").glob("*.png"))
    (tmp_path / "list.csv").write_text("path,label\nb.jpg,1\na.jpg,2\nb.jpg,3\n")
    assert list_inputs(str(tmp_path / "list.csv")) == [{"path": "b.jpg"}, {"path": "a.jpg"}]  # each once, in order
    pq.write_table(pa.table({"path": ["x.png", "y.png", "x.png"], "question": ["What?", None, "Who?"]}),
                   tmp_path / "list.parquet")
    assert list_inputs(str(tmp_path / "list.parquet")) == [  # a row is its path and what it asks
        {"path": "x.png", "question": "What?"}, {"path": "y.png", "question": None}, {"path": "x.png", "question": "Who?"}]
    (tmp_path / "asks.csv").write_text("path,task,text\na.jpg,<OD>,\na.jpg,<CAPTION_TO_PHRASE_GROUNDING>,a cat\n")
    assert list_inputs(str(tmp_path / "asks.csv")) == [
        {"path": "a.jpg", "task": "<OD>", "text": None},
        {"path": "a.jpg", "task": "<CAPTION_TO_PHRASE_GROUNDING>", "text": "a cat"}]
    (tmp_path / "nopath.csv").write_text("file\na.jpg\n")
    with pytest.raises(BatchError, match=r"nopath.csv: no 'path' column \(columns: file\)"):
        list_inputs(str(tmp_path / "nopath.csv"))
    with pytest.raises(BatchError, match="no such folder, file or glob"):
        list_inputs(str(tmp_path / "missing"))
    with pytest.raises(BatchError, match="no images found"):
        list_inputs(str(tmp_path / "*.webp"))


def test_what_rows_ask_must_be_what_the_package_takes():
    rows, none = [{"path": "a.jpg"}, {"path": "b.jpg", "question": "Who?"}], {"question": None, "task": None, "text": None}
    vqa = {"question": True}
    assert apply_options([{"path": "a.jpg"}], {**none, "question": "What?"}, vqa) == [{"path": "a.jpg", "question": "What?"}]
    with pytest.raises(BatchError, match="--question and the input's question column both say what to ask"):
        apply_options(rows, {**none, "question": "What?"}, vqa)
    with pytest.raises(BatchError, match="this model needs a question for every image"):
        apply_options(rows, none, vqa)
    with pytest.raises(BatchError, match=r"this model takes no question \(it takes: only images\)"):
        apply_options(rows, none, {})
    with pytest.raises(BatchError, match=r"this model takes no task \(it takes: question\)"):
        apply_options([{"path": "a.jpg"}], {**none, "task": "<OD>"}, {"question": False})
    assert apply_options(rows, none, {"question": False}) == rows  # a chat model's question is optional


def test_resources_that_could_never_be_scheduled_are_refused():
    """On 2 CPUs, two 1-CPU actors plus the writer would wait forever: shares are made to fit."""
    assert actor_resources(2, 1, None, 0) == 1.75
    assert actor_resources(2, 2, None, 0) == 0.875
    assert actor_resources(8, 2, None, 1) == 1.0  # beside a GPU: a core each to decode
    with pytest.raises(BatchError, match=r"2 actor\(s\) x 1 CPU \+ 0.25 for the writer need 2.25 CPUs; the cluster has 2"):
        actor_resources(2, 2, 1.0, 0)
    with pytest.raises(BatchError, match="--actors must be at least 1"):
        actor_resources(2, 0, None, 0)


def test_usage_errors_exit_2_before_starting_ray(tmp_path):
    (tmp_path / "one.csv").write_text("path\na.jpg\n")
    for args, message in [([str(tmp_path / "none"), "--out", str(tmp_path / "o")], "no such folder, file or glob"),
                          ([str(tmp_path), "--out", str(tmp_path / "o"), "--model", str(tmp_path)], "manifest"),
                          ([str(tmp_path), "--out", str(tmp_path / "o"), "--batch-size", "0"], "--batch-size"),
                          ([str(tmp_path / "one.csv"), "--out", str(tmp_path / "o"), "--question", "Who?"],
                           "this model takes no question")]:
        r = subprocess.run([sys.executable, "-m", "runtime.batch", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1
