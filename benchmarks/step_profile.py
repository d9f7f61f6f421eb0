"""python -m benchmarks.step_profile PKG [PKG ...] [--image IMG] [--tokens N] [--threads N]

Where a decoder step's time goes, by ONNX op type: ONNX Runtime's own profiler over the decode
steps of greedy answers (the prefills excluded; EOS off, so every answer is N tokens), for several
packages of one model side by side (its FP32, INT8 and INT4 packages), taking turns. For each
package: the step's median wall time, its weight-read floor (decoder weight bytes / this machine's
read bandwidth, as benchmarks.latency measures it) and each op type's ms per step; beside it, the
step unprofiled, each decoder run timed (the profiler's per-node records add to the step). What is not the weights' MatMul is the per-node cost of the step's small
ops. Writes benchmarks/results/step-profile-<model>.{md,json} (or --out DIR).
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnxruntime as ort

from runtime import Captioner, ImageError, PackageError
from runtime.graphs import Graphs, session_options

from .latency import NO_EOS, decoder_weight_bytes, read_bandwidth_gb_s

RESULTS = Path(__file__).parent / "results"
SAMPLE = Path(__file__).parent.parent / "runtime" / "samples" / "chelsea.jpg"
WEIGHTS = ("MatMul", "MatMulNBits", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul")  # ops that read the weights


def profiled(package: Path, threads: int, prefix: Path) -> Captioner:
    """A Captioner whose decoder session records ONNX Runtime's profile, EOS off."""
    cap = Captioner(package, provider="cpu", threads=threads)
    opts = session_options(cap.manifest.data["precision"], threads)
    opts.enable_profiling, opts.profile_file_prefix = True, str(prefix)
    decoder = ort.InferenceSession(str(cap.manifest.path(cap.manifest.graph("decoder")["file"])), opts,
                                   providers=["CPUExecutionProvider"])
    cap.graphs, cap.eos = Graphs(cap.graphs.vision, decoder, cap.manifest.decoder), NO_EOS
    return cap


def steps_by_op(cap: Captioner, package: Path, tokens: int, prompt_tokens: int) -> dict:
    """The profile's decode steps: every answer's runs but its first (the prefill), the warm-up
    answer's none."""
    events = json.loads(Path(cap.graphs.decoder.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    steps = [run for i, run in enumerate(runs[tokens:]) if i % tokens]
    ops = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and any(a <= e["ts"] < b for a, b in steps):
            ops[e["args"]["op_name"]] += e["dur"] / 1e3 / len(steps)
    return {"package": str(package), "model": cap.manifest.data["source"]["model"],
            "precision": cap.manifest.data["precision"], "prompt_tokens": prompt_tokens, "steps": len(steps),
            "step_ms": round(statistics.median(b - a for a, b in steps) / 1e3, 2),
            "decoder_weight_mib": round(decoder_weight_bytes(package) / 2**20, 1),
            "nodes_ms": round(sum(ops.values()), 2), "weights_ms": round(sum(ops[o] for o in WEIGHTS), 2),
            "ops_ms": {op: round(ms, 3) for op, ms in ops.most_common()}}


def unprofiled_step_ms(packages: list[Path], image: Path, tokens: int, threads: int, rounds: int) -> list[float]:
    """Each package's decode step without the profiler (whose per-node records add to the step):
    the wall time of every decoder run after an answer's prefill, the packages answering in turns,
    medians. Timed run by run: an answer's time less its first token's, measured apart, carries the
    vision graph's run-to-run spread (a second over SmolVLM's 13 tiles is 30 ms per token)."""
    caps, times = [Captioner(package, provider="cpu", threads=threads) for package in packages], []
    for cap in caps:
        cap.eos, graph_step, ms = NO_EOS, cap.graphs.step, []

        def timed_step(ids, positions, cache, *args, graph_step=graph_step, ms=ms):
            start = time.perf_counter()
            logits = graph_step(ids, positions, cache, *args)
            if (cache.lengths > cache.start).all():  # a decode step: the prompt is in the cache
                ms.append((time.perf_counter() - start) * 1e3)
            return logits

        cap.graphs.step = timed_step
        times.append(ms)
    for round_ in range(rounds + 1):
        for cap, ms in zip(caps, times):
            cap.caption(image, max_new_tokens=tokens, num_beams=1)
            if not round_:  # the warm-up answer's steps are left out
                ms.clear()
    return [round(statistics.median(ms), 2) for ms in times]


def profile(packages: list[Path], image: Path, tokens: int, threads: int, rounds: int, traces: Path) -> list[dict]:
    """Each package answers once to warm up, then `rounds` times, the packages taking turns (a
    machine's drift falls on all of them alike); then the same unprofiled."""
    caps = [profiled(p, threads, traces / f"trace{i}") for i, p in enumerate(packages)]
    prompt_tokens = {}
    for _ in range(rounds + 1):
        for cap in caps:
            prompt_tokens[id(cap)] = cap.caption(image, max_new_tokens=tokens, num_beams=1).prompt_tokens
    results = [steps_by_op(cap, p, tokens, prompt_tokens[id(cap)]) for cap, p in zip(caps, packages)]
    del caps
    for result, ms in zip(results, unprofiled_step_ms(packages, image, tokens, threads, rounds)):
        result["unprofiled_step_ms"] = ms
    return results


def report(results: list[dict], meta: dict) -> str:
    """A markdown table: op types (the 12 costliest over all packages, then the rest) by package."""
    names = [r["precision"] for r in results]
    if len(set(names)) < len(names):  # two packages of one precision (two exports compared): their folders
        names = [Path(r["package"]).name for r in results]
    total = Counter()
    for r in results:
        total.update(r["ops_ms"])
    top = [op for op, _ in total.most_common(12)]
    lines = [f"# Decoder step profile: {results[0]['model']}", "",
             f"{meta['cpu']}, {meta['threads']} threads, onnxruntime {meta['onnxruntime']}; {results[0]['prompt_tokens']}-token "
             f"prompt, {results[0]['steps']} decode steps in {meta['rounds']} interleaved answers; read bandwidth {meta['read_gb_s']:.1f} GB/s", "",
             "| ms per step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    rows = {"step, unprofiled (median)": [r["unprofiled_step_ms"] for r in results],
            "step, profiled (wall, median)": [r["step_ms"] for r in results],
            "weight-read floor": [r["decoder_weight_mib"] * 2**20 / (meta["read_gb_s"] * 1e9) * 1e3 for r in results],
            "MatMuls (the weights'; attention's A.V)": [r["weights_ms"] for r in results],
            "every other node": [r["nodes_ms"] - r["weights_ms"] for r in results],
            "between nodes (the run's own cost, the profiler's included)": [r["step_ms"] - r["nodes_ms"] for r in results],
            **{f"  {op}": [r["ops_ms"].get(op, 0.0) for r in results] for op in top if op not in WEIGHTS},
            "  the rest": [sum(ms for op, ms in r["ops_ms"].items() if op not in top and op not in WEIGHTS) for r in results]}
    lines += [f"| {label} | " + " | ".join(f"{v:.2f}" for v in values) + " |" for label, values in rows.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("packages", type=Path, nargs="+", help="packages of one model (FP32, INT8, INT4, ...)")
    parser.add_argument("--image", type=Path, default=SAMPLE)
    parser.add_argument("--tokens", type=int, default=32, help="decode steps per answer, plus one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="measured answers per package, taken in turns")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the .md and .json go (default %(default)s)")
    args = parser.parse_args(argv)
    if args.tokens < 2:
        parser.error("--tokens must be at least 2")
    try:
        with tempfile.TemporaryDirectory() as traces:  # ONNX Runtime's raw traces: large, read in profile
            results = profile(args.packages, args.image, args.tokens, args.threads, args.rounds, Path(traces))
    except (PackageError, ImageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "rounds": args.rounds,
            "onnxruntime": ort.__version__,
            "read_gb_s": read_bandwidth_gb_s(args.threads)}
    table = report(results, meta)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "step-profile-" + results[0]["model"].split()[0].removesuffix("ForConditionalGeneration").lower()
    (args.out / f"{name}.md").write_text(table)
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "packages": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
