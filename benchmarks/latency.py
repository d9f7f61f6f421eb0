"""python -m benchmarks.latency [--model PKG] [--quick] [--json OUT]

Eager PyTorch vs the runtime, side by side in one process: rounds interleave the
variants (A B A B ...) after a warm-up, and the report gives medians and p90 over
rounds, per caption and per generated token, at batch 1. Then whole processes: cold
start of `python -m runtime.caption` and peak RSS, runtime vs eager.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SAMPLES = Path(__file__).parent.parent / "runtime" / "samples"


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return (time.perf_counter() - start) * 1000, out


def percentile(values, q):
    return float(np.percentile(values, q))


def measure(variants: dict, images: list, rounds: int) -> dict:
    """variants: name -> (vision_fn(image), caption_fn(image) -> tokens)."""
    samples = {name: {"vision_ms": [], "caption_ms": [], "ms_per_token": [], "tokens": []} for name in variants}
    for vision, caption in variants.values():  # warm-up: allocations, thread pools, lazy init
        vision(images[0])
        caption(images[0])
    for _ in range(rounds):
        for image in images:
            for name, (vision, caption) in variants.items():
                s = samples[name]
                s["vision_ms"].append(timed(vision, image)[0])
                ms, tokens = timed(caption, image)
                s["caption_ms"].append(ms)
                s["ms_per_token"].append(ms / (len(tokens) + 1))  # + EOS: every step is a graph run
                s["tokens"].append(len(tokens) + 1)
    return {name: {f"{k}_{stat}": round(f(v), 3) for k, v in s.items() if k != "tokens"
                   for stat, f in (("median", statistics.median), ("p90", lambda x: percentile(x, 90)))}
            | {"tokens_mean": float(np.mean(s["tokens"]))}
            for name, s in samples.items()}


RUNTIME_PROCESS = """
import sys
from runtime.caption import main
main([sys.argv[1]])
"""
EAGER_PROCESS = """
import sys
from export.reference import Reference, checkpoint_for
from export.train import DEFAULT_CHECKPOINT
from runtime.manifest import load_manifest
from runtime import DEFAULT_MODEL
manifest = load_manifest(DEFAULT_MODEL).data
ref = Reference(checkpoint_for(manifest, DEFAULT_CHECKPOINT.parent), manifest)
from runtime.search import GenerationConfig
print(ref.decode(ref.generate([sys.argv[1]], GenerationConfig(manifest["generation"]["max_new_tokens"]))[0]))
"""
# The child's own peak: VmHWM belongs to the exec'd address space. (ru_maxrss from wait4
# would count the benchmark's own pages, torch included, from before the child's exec.)
PEAK_RSS = """
print("VmHWM", next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1], file=sys.stderr)
"""


def process_costs(image: Path, runs: int) -> dict:
    """Whole processes, as a user starts them: wall time of `python -m runtime.caption`
    (imports, session creation, one caption) and peak RSS, runtime vs eager PyTorch."""
    root = Path(__file__).parent.parent

    def child(code):
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code + PEAK_RSS, str(image)], cwd=root, capture_output=True,
                           text=True, timeout=600)
        seconds = time.perf_counter() - start
        if r.returncode != 0:
            raise SystemExit(f"error: a benchmark process failed: {r.stderr.strip().splitlines()[-1:]}")
        return seconds, int(r.stderr.split("VmHWM")[-1].split()[0]) / 1024  # KiB -> MiB

    runtime = [child(RUNTIME_PROCESS) for _ in range(runs)]
    eager = [child(EAGER_PROCESS) for _ in range(runs)]
    return {"runtime_cold_start_s": round(statistics.median(t for t, _ in runtime), 3),
            "eager_cold_start_s": round(statistics.median(t for t, _ in eager), 3),
            "runtime_peak_rss_mib": round(max(r for _, r in runtime), 1),
            "eager_peak_rss_mib": round(max(r for _, r in eager), 1)}


def report(results: dict, meta: dict) -> str:
    base = results["eager PyTorch"]["caption_ms_median"]
    lines = [f"Batch 1, greedy, {meta['threads']} threads, {meta['rounds']} interleaved rounds x "
             f"{meta['images']} images, medians (p90). {meta['machine']}.", "",
             "| variant | vision ms | ms / caption | ms / token | speed-up vs eager |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['vision_ms_median']:.1f} ({r['vision_ms_p90']:.1f}) | "
                     f"{r['caption_ms_median']:.1f} ({r['caption_ms_p90']:.1f}) | "
                     f"{r['ms_per_token_median']:.2f} ({r['ms_per_token_p90']:.2f}) | "
                     f"{base / r['caption_ms_median']:.2f}x |")
    if "process" in meta:
        p = meta["process"]
        lines += ["", f"Whole process, one caption (median of {meta['process_runs']} fresh processes): "
                  f"`python -m runtime.caption` {p['runtime_cold_start_s']:.2f} s and {p['runtime_peak_rss_mib']:.0f} MiB "
                  f"peak RSS; eager PyTorch {p['eager_cold_start_s']:.2f} s and {p['eager_peak_rss_mib']:.0f} MiB "
                  f"({p['eager_peak_rss_mib'] / p['runtime_peak_rss_mib']:.1f}x the runtime's memory)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2 rounds, for smoke runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    from export.reference import Reference, checkpoint_for
    from export.train import DEFAULT_CHECKPOINT
    from runtime import DEFAULT_MODEL, Captioner
    from runtime.preprocess import load_pixels

    torch.set_num_threads(args.threads)
    captioner = Captioner(args.model or DEFAULT_MODEL, provider="cpu", threads=args.threads)
    ref = Reference(checkpoint_for(captioner.manifest.data, DEFAULT_CHECKPOINT.parent), captioner.manifest.data)
    cfg = captioner.generation_config()
    images = sorted(SAMPLES.glob("*.jpg"))
    variants = {
        "eager PyTorch": (lambda i: ref.cross(ref.pixels([i])),
                          lambda i: ref.generate([i], cfg)[0]),
        "runtime FP32": (lambda i: captioner.encode(load_pixels(i, captioner.manifest.preprocess)[None]),
                         lambda i: captioner.caption(i).tokens),
    }
    rounds = 2 if args.quick else args.rounds
    results = measure(variants, images, rounds)
    process_runs = 1 if args.quick else 5
    meta = {"threads": args.threads, "rounds": rounds, "images": len(images),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
                       f"onnxruntime {__import__('onnxruntime').__version__}, torch {torch.__version__}",
            "provider": captioner.provider, "process_runs": process_runs,
            "process": process_costs(images[0], process_runs)}
    table = report(results, meta)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    payload = json.dumps({"meta": meta, "results": results}, indent=2) + "\n"
    if not args.quick:
        (RESULTS / "latency-cpu.md").write_text(table)
        (RESULTS / "latency-cpu.json").write_text(payload)
    if args.json:
        args.json.write_text(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
