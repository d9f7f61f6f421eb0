"""python -m runtime.batch INPUT --out OUT: caption a whole photo library or dataset with Ray Data
(the `scale` extra), on this machine or on a Ray cluster (`--address`).

INPUT is a folder (searched recursively), a glob, or a Parquet/CSV file with a `path` column and,
optionally, `question`, `task` and `text` columns: what each row asks, as the CLI's options (which
set them for every row). OUT is a Parquet dataset, one row per input row: path, what it asked,
caption, result (Florence-2's structured answer as JSON), tokens, ms, error, and the package that
made it (name, precision, SHA-256 of its manifest, which pins every graph file).

Resumable, exactly once: a rerun with the same OUT skips the rows (path and what it asks) already
written. Parquet
writes its footer last, so a part cut short by a killed job has none: a part of this job's
own naming (edgecap-*.parquet) whose file does not end in Parquet's footer magic is deleted and its
images captioned again. Any other file in OUT that cannot be read stops the run before any work,
naming it; nothing else is ever deleted. A bad image is a row with an error, never a failed job.

Exit status: 0 when every image has a caption, 1 when some rows carry an error, 2 for usage
errors (bad INPUT, OUT, model package, or resources the cluster cannot give).
"""

import argparse
import csv
import glob
import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path

from .cli import IMAGE_SUFFIXES, add_asking_options, add_model_options
from .engine import DEFAULT_MODEL, Caption, Captioner
from .manifest import PackageError, load_manifest

WRITER_CPUS = 0.25  # the Parquet writer's share: actors must leave it room, or the job waits forever
PART = re.compile(r"edgecap-[0-9a-f]+_\d{6}(-\d+)?\.parquet")  # the parts this job writes (part_names)
MAGIC = b"PAR1"  # a Parquet file starts and ends with it; the end comes last, with the footer
ASKED = ("question", "task", "text")  # what a row may ask (Prompting.text_inputs)


class BatchError(Exception):
    """A job that cannot start; one line."""


def schema():
    import pyarrow as pa

    return pa.schema([("path", pa.string()), *((name, pa.string()) for name in ASKED), ("caption", pa.string()),
                      ("result", pa.string()), ("tokens", pa.list_(pa.int32())), ("ms", pa.float32()),
                      ("error", pa.string()), ("model", pa.string()), ("precision", pa.string()),
                      ("package_sha256", pa.string())])


def row_key(row: dict) -> tuple:
    """What makes a row once: its path and what it asks."""
    return (row["path"], *(row.get(name) for name in ASKED))


def list_inputs(spec: str) -> list[dict]:
    """The rows INPUT names ({"path", and what a table's row asks}), in a stable order, each once."""
    path = Path(spec)
    if path.is_dir():
        found = [{"path": str(p)} for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    elif path.suffix.lower() in (".parquet", ".csv") and path.is_file():
        found = table_rows(path)
    else:
        found = [{"path": p} for p in sorted(glob.glob(spec, recursive=True))]
        if not found and not glob.has_magic(spec):
            raise BatchError(f"{spec}: no such folder, file or glob")
    if not found:
        raise BatchError(f"{spec}: no images found")
    return list({row_key(row): row for row in found}.values())


def table_rows(table: Path) -> list[dict]:
    """A table's rows with a path: the path and the ASKED columns it has (empty cells: not asked)."""
    if table.suffix.lower() == ".csv":
        with open(table, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            names = reader.fieldnames or []
            rows = list(reader)
    else:
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(table).names
        except Exception as e:
            raise BatchError(f"{table}: not a Parquet file: {e}") from None
        rows = pq.read_table(table, columns=[n for n in ("path", *ASKED) if n in names]).to_pylist()
    if "path" not in names:
        raise BatchError(f"{table}: no 'path' column (columns: {', '.join(names)})")
    return [{"path": row["path"], **{n: row[n] or None for n in ASKED if n in names}} for row in rows if row["path"]]


def apply_options(rows: list[dict], options: dict, takes: dict[str, bool]) -> list[dict]:
    """Rows with the CLI's --question/--task/--text set on each; refused (BatchError) where a
    table's column says otherwise, or where the package takes no such input or needs one a row lacks."""
    for name, value in options.items():
        if value is not None and any(name in row for row in rows):
            raise BatchError(f"--{name} and the input's {name} column both say what to ask; give one")
    rows = [{**row, **{k: v for k, v in options.items() if v is not None}} for row in rows]
    for name in ASKED:
        if name not in takes and any(row.get(name) is not None for row in rows):
            raise BatchError(f"this model takes no {name} (it takes: {', '.join(takes) or 'only images'})")
        if takes.get(name) and any(row.get(name) is None for row in rows):
            raise BatchError(f"this model needs a {name} for every image: --{name}, or a {name} column without gaps")
    return rows


def cut_short(part: Path) -> bool:
    """A part of ours whose footer provably never got written (a killed writer)."""
    if not PART.fullmatch(part.name):
        return False
    with open(part, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - len(MAGIC)))
        return size < 2 * len(MAGIC) or f.read() != MAGIC


def written(out: Path) -> set[tuple]:
    """Rows (row_key) already in OUT. Parts of ours cut short by a kill are deleted (to be redone); any
    other Parquet file that cannot be read is a BatchError naming it, before anything is deleted."""
    import pyarrow.parquet as pq

    parts, short = sorted(out.glob("*.parquet")) if out.is_dir() else [], []
    done = set()
    for part in parts:
        try:
            if cut_short(part):
                short.append(part)
                continue
            names = pq.read_schema(part).names  # parts of an earlier version ask nothing
            done.update(map(row_key, pq.read_table(part, columns=[n for n in ("path", *ASKED) if n in names]).to_pylist()))
        except Exception as e:  # permissions, another tool's file, a newer format, a network hiccup
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BatchError(f"{part}: cannot be read ({reason}); OUT must hold only this job's parts: "
                             "move the file away or choose another --out") from None
    for part in short:
        part.unlink()
    return done


def part_names():
    """Ray's filename provider for this job's parts: names `written` can tell from any other file."""
    from ray.data.datasource import FilenameProvider

    class Parts(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"edgecap-{write_uuid.replace('-', '')}_{task_index:06}.parquet"

    return Parts()


class CaptionActor:
    """One per actor: loads the package once, captions batches of paths. Files are read and
    decoded here, inside the actors, so that a missing or broken file is a row with an error."""

    def __init__(self, model: str | None, provider: str, threads: int):
        warnings.filterwarnings("ignore", module="PIL")
        self.captioner = Captioner(model, provider=provider, threads=threads)
        manifest = self.captioner.manifest
        self.identity = {"model": manifest.data["name"], "precision": manifest.data["precision"],
                         "package_sha256": manifest.digest}

    def __call__(self, batch: dict):
        import pyarrow as pa

        paths = [str(p) for p in batch["path"]]
        # A column with no text at all arrives as NaNs: only strings ask anything.
        asked = [{name: str(v) if isinstance(v := batch[name][i], str) else None for name in ASKED}
                 for i in range(len(paths))]
        groups, results = {}, [None] * len(paths)
        for i, a in enumerate(asked):  # rows asking the same share forward passes
            groups.setdefault(tuple(a.values()), []).append(i)
        for rows in groups.values():
            try:
                done = self.captioner.caption([paths[i] for i in rows], batch_size=len(rows), **asked[rows[0]])
            except ValueError as e:  # what this row asks does not fit the model: its error, not the job's
                done = [Caption(image=paths[i], error=str(e)) for i in rows]
            for i, r in zip(rows, done):
                results[i] = r
        columns = {"path": paths, **{name: [a[name] for a in asked] for name in ASKED},
                   "caption": [r.text for r in results],
                   "result": [None if r.result is None else json.dumps(r.result) for r in results],
                   "tokens": [r.tokens for r in results], "ms": [r.ms if r.error is None else None for r in results],
                   "error": [r.error for r in results], **{k: [v] * len(paths) for k, v in self.identity.items()}}
        return pa.table(columns, schema=schema())


def actor_resources(total_cpus: float, actors: int, cpus: float | None, gpus: float) -> float:
    """CPUs per actor: as asked, or an equal share of what the writer leaves. Refuses what could
    never be scheduled instead of waiting for it forever."""
    if actors < 1:
        raise BatchError("--actors must be at least 1")
    if cpus is None:  # on CPUs the actors share the machine; beside a GPU an actor needs a core to decode
        cpus = (total_cpus - WRITER_CPUS) / actors if gpus == 0 else min(1.0, (total_cpus - WRITER_CPUS) / actors)
    if cpus <= 0 or actors * cpus + WRITER_CPUS > total_cpus:
        raise BatchError(f"{actors} actor(s) x {cpus:g} CPU + {WRITER_CPUS:g} for the writer need "
                         f"{actors * cpus + WRITER_CPUS:g} CPUs; the cluster has {total_cpus:g}")
    return cpus


def run(inputs: list[dict], done: set[tuple], out: Path, model: str | None, provider: str, actors: int,
        batch_size: int, cpus: float | None, gpus: float, threads: int | None) -> dict:
    """Captions the inputs not `done` (already in OUT); returns counts for the summary. Ray must be
    initialised."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import ray

    todo = [row for row in inputs if row_key(row) not in done]
    start = time.perf_counter()
    if todo:
        per_actor = actor_resources(ray.cluster_resources().get("CPU", 0), actors, cpus, gpus)
        # Each block becomes one Parquet file: small enough that an interrupted job redoes little,
        # few enough (at most ~1,000 per run) that a million images do not make a million files.
        rows = max(4 * batch_size, -(-len(todo) // 1000))
        items = ray.data.from_items([{"path": r["path"], **{n: r.get(n) for n in ASKED}} for r in todo],
                                    override_num_blocks=-(-len(todo) // rows))
        captions = items.map_batches(
            CaptionActor, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={"model": model, "provider": provider,
                                   "threads": threads or max(1, round(per_actor))},
            num_cpus=per_actor, num_gpus=gpus or None, batch_format="numpy")
        captions.write_parquet(str(out), ray_remote_args={"num_cpus": WRITER_CPUS}, schema=schema(),
                               filename_provider=part_names())
    elapsed = time.perf_counter() - start
    table = pads.dataset(str(out), format="parquet", schema=schema()).to_table(columns=["path", "error"])
    mine = pc.is_in(table.column("path"), value_set=pa.array([r["path"] for r in todo], type=pa.string()))
    errors = pc.sum(pc.and_(mine, pc.is_valid(table.column("error")))).as_py() or 0
    return {"images": len(todo), "skipped": len(inputs) - len(todo), "errors": errors, "seconds": elapsed,
            "rows": table.num_rows, "errors_in_out": pc.sum(pc.is_valid(table.column("error"))).as_py() or 0}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", metavar="INPUT", help="folder (recursive), glob, or Parquet/CSV file with a path column")
    parser.add_argument("--out", type=Path, required=True, help="Parquet dataset folder; a rerun resumes it")
    add_model_options(parser, precision=False, threads="ONNX Runtime threads per actor (default: its CPUs)")
    add_asking_options(parser)  # for every image; a CSV/Parquet input may carry them per row instead
    parser.add_argument("--actors", type=int, default=1, help="actors, each holding the model once (default 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--cpus-per-actor", type=float, default=None,
                        help="default: an equal share of the CPUs the writer leaves (at most 1 with --gpus-per-actor)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="e.g. 1, or 0.5 for two actors per GPU")
    parser.add_argument("--address", default=None, help="an existing Ray cluster (default: a local one)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import ray
    except ImportError:
        print("error: batch captioning needs Ray Data: pip install 'edgecap[scale]'", file=sys.stderr)
        return 2
    try:
        if args.batch_size < 1:
            raise BatchError("--batch-size must be at least 1")
        # A bad package or what it cannot be asked is refused here, not in every actor.
        takes = load_manifest(args.model or DEFAULT_MODEL).prompting.text_inputs
        options = {"question": args.question, "task": args.task, "text": args.text}
        # Paths must mean the same files to every actor: relative ones are made absolute here.
        inputs = apply_options([{**row, "path": os.path.abspath(row["path"])} for row in list_inputs(args.input)],
                               options, takes)
        if args.out.exists() and not args.out.is_dir():
            raise BatchError(f"{args.out}: exists and is not a folder")
        done = written(args.out)
    except (BatchError, PackageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("ray").setLevel(logging.WARNING)
    try:
        ray.init(address=args.address, logging_level=logging.WARNING, include_dashboard=False, log_to_driver=False)
    except Exception as e:  # no cluster at --address, no room for the object store, ...
        print(f"error: cannot start Ray: {(str(e).strip().splitlines() or [type(e).__name__])[-1]}", file=sys.stderr)
        return 2
    try:
        summary = run(inputs, done, args.out, args.model and os.path.abspath(args.model), args.provider, args.actors,
                      args.batch_size, args.cpus_per_actor, args.gpus_per_actor, args.threads)
    except BatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ray.exceptions.RayError as e:  # e.g. actors that die on every retry: a rerun resumes
        print(f"error: the job failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    rate = summary["images"] / summary["seconds"] if summary["seconds"] else 0.0
    print(f"{summary['images']} images captioned ({summary['errors']} errors) in {summary['seconds']:.1f} s, "
          f"{rate:.1f} images/s; {summary['skipped']} already in {args.out}; "
          f"{summary['rows']} rows there, {summary['errors_in_out']} with errors", file=sys.stderr)
    return 1 if summary["errors_in_out"] else 0


if __name__ == "__main__":
    sys.exit(main())
