"""python -m benchmarks.serve [--model PKG] [--levels 1 4 16 64] [--requests N] [--threads N] [--rounds N]

Load on the caption service: `python -m runtime.serve` in its own process on 127.0.0.1, closed-loop
clients (each sends its next request when the last one is answered) at each concurrency level, a
fixed number of requests per level, every request one real photo (export/heldout) through
`POST /caption`. Reports images/s, p50/p90/p99 latency, errors by status, forward passes and
images per pass (from the server's /metrics), and the server's RSS before and after. The comparison
with captioning in this process is interleaved: rounds of (the photos one at a time, the photos in
batches of --max-batch, the service at --compare clients), medians of the rates and of the per-round
ratios, so that drift of the machine's speed falls on both sides. Then an overload run (concurrency 64 against a queue of 16): only 503s beyond the queue, and
every caption that comes back is its own image's. Writes benchmarks/results/serve-cpu.{json,md,png}.
"""

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from export.evaluation import heldout_photos
from runtime import Captioner

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def passes(port: int) -> tuple[float, float]:
    """(forward passes, images in them) so far, from the server's /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    value = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("edgecap_batch_images_")}
    return value["edgecap_batch_images_count"], value["edgecap_batch_images_sum"]


class Server:
    """`python -m runtime.serve ARGS` on a free loopback port, started and waited for; `stop`
    sends SIGTERM (the service drains) and kills only if it does not exit."""

    def __init__(self, args: list[str]):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--port", str(self.port), *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the server did not start: {self.proc.stderr.read()}")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def load(port: int, images: list[bytes], expected: list[str], concurrency: int, requests: int) -> dict:
    """Closed-loop clients; request i sends image i % len(images). Returns what was measured."""
    latencies, statuses, wrong, lock, counter = [], {}, [0], threading.Lock(), iter(range(requests))

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            start = time.perf_counter()
            conn.request("POST", "/caption", body=images[i % len(images)])
            response = conn.getresponse()
            body = json.loads(response.read())
            with lock:
                latencies.append(time.perf_counter() - start)
                statuses[response.status] = statuses.get(response.status, 0) + 1
                wrong[0] += response.status == 200 and body["caption"] != expected[i % len(images)]
        conn.close()

    before = passes(port)
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    count, images_in = (a - b for a, b in zip(passes(port), before))
    ms = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": requests, "images_per_s": round(statuses.get(200, 0) / elapsed, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p90_ms": round(float(np.percentile(ms, 90)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "statuses": statuses, "wrong_captions": wrong[0],
            "forward_passes": int(count), "images_per_pass": round(images_in / count, 2) if count else 0.0}


def interleaved(port: int, captioner: Captioner, images: list[bytes], expected: list[str], concurrency: int,
                rounds: int, requests: int, max_batch: int) -> dict:
    """Medians over rounds of: in-process one at a time, in-process batches of `max_batch`, the
    service at `concurrency` clients (images/s each, and the per-round ratios)."""
    rates = []
    for r in range(rounds):
        chunk = [images[(r * requests // 2 + i) % len(images)] for i in range(requests // 2)]
        start = time.perf_counter()
        for image in chunk:
            captioner.caption(image)
        one = len(chunk) / (time.perf_counter() - start)
        start = time.perf_counter()
        captioner.caption(chunk, batch_size=max_batch)
        batched = len(chunk) / (time.perf_counter() - start)
        rates.append((one, batched, load(port, images, expected, concurrency, requests)["images_per_s"]))
    one, batched, service = np.array(rates).T
    median = lambda x: round(float(np.median(x)), 2)  # noqa: E731
    return {"concurrency": concurrency, "rounds": rounds, "requests_per_round": requests,
            "one_at_a_time_images_per_s": median(one), "batched_images_per_s": median(batched),
            "service_images_per_s": median(service), "service_vs_one_at_a_time": median(service / one),
            "batched_vs_one_at_a_time": median(batched / one), "service_vs_batched": median(service / batched)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["concurrency"] for r in levels]
    left.plot(x, [r["images_per_s"] for r in levels], "o-", label="service")
    left.axhline(result["interleaved"]["one_at_a_time_images_per_s"], color="gray", ls="--",
                 label="one at a time, in-process")
    left.axhline(result["interleaved"]["batched_images_per_s"], color="gray", ls=":",
                 label=f"batches of {result['max_batch']}, in-process")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="images / s", title="throughput")
    left.legend()
    for key in ("p50_ms", "p90_ms", "p99_ms"):
        right.plot(x, [r[key] for r in levels], "o-", label=key.removesuffix("_ms"))
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms", title="latency")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def table(result: dict) -> str:
    c = result["interleaved"]
    rows = [f"Caption service on {result['machine']}, bundled model ({result['precision']}), "
            f"`--max-batch {result['max_batch']} --max-delay-ms {result['max_delay_ms']}`, "
            f"{result['threads']} ONNX Runtime threads; clients in the same machine. "
            f"Server RSS {result['rss_mib_before']:.0f} MiB before, {result['rss_mib_after']:.0f} MiB after.", "",
            f"Interleaved, medians of {c['rounds']} rounds: in-process one at a time "
            f"{c['one_at_a_time_images_per_s']:.1f} images/s, in-process batches of {result['max_batch']} "
            f"{c['batched_images_per_s']:.1f} ({c['batched_vs_one_at_a_time']:.2f}x), the service at "
            f"{c['concurrency']} clients {c['service_images_per_s']:.1f} ({c['service_vs_one_at_a_time']:.2f}x one at a "
            f"time, {c['service_vs_batched']:.2f}x in-process batches).", "",
            "| clients | requests | images/s | x one at a time | p50 ms | p90 ms | p99 ms | statuses | wrong captions "
            "| passes | images/pass |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in [*result["levels"], {**result["overload"], "concurrency": f"{result['overload']['concurrency']} (queue 16)"}]:
        rows.append(f"| {r['concurrency']} | {r['requests']} | {r['images_per_s']:.1f} | "
                    f"{r['images_per_s'] / c['one_at_a_time_images_per_s']:.2f}x | {r['p50_ms']} | {r['p90_ms']} | "
                    f"{r['p99_ms']} | {', '.join(f'{k}: {v}' for k, v in sorted(r['statuses'].items()))} | "
                    f"{r['wrong_captions']} | {r['forward_passes']} | {r['images_per_pass']} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=192, help="per level (the overload run sends twice that)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--compare", type=int, default=16, help="clients in the interleaved comparison")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the interleaved comparison")
    args = parser.parse_args(argv)
    images = [p.read_bytes() for p in heldout_photos()]
    captioner = Captioner(args.model, provider="cpu", threads=args.threads)
    expected = [c.text for c in captioner.caption(images, batch_size=1)]
    common = ["--provider", "cpu", "--threads", str(args.threads), "--max-batch", str(args.max_batch),
              "--max-delay-ms", str(args.max_delay_ms), *(["--model", str(args.model)] if args.model else [])]
    server = Server(common + ["--max-queue", "256"])
    try:
        load(server.port, images, expected, 64, 128)  # warm-up at the largest passes: RSS after it is the baseline
        rss_before = rss_mib(server.proc.pid)
        levels = []
        for level in args.levels:
            levels.append(load(server.port, images, expected, level, args.requests))
            print(json.dumps(levels[-1]), flush=True)
        compared = interleaved(server.port, captioner, images, expected, args.compare, args.rounds,
                               min(args.requests, 96), args.max_batch)
        print(json.dumps(compared), flush=True)
        rss_after = rss_mib(server.proc.pid)
    finally:
        server.stop()
    server = Server(common + ["--max-queue", "16"])
    try:
        overload = load(server.port, images, expected, 64, 2 * args.requests)
        print(json.dumps(overload), flush=True)
    finally:
        server.stop()
    result = {"machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
              "precision": captioner.manifest.data["precision"], "threads": args.threads, "max_batch": args.max_batch,
              "max_delay_ms": args.max_delay_ms, "interleaved": compared,
              "rss_mib_before": round(rss_before, 1), "rss_mib_after": round(rss_after, 1), "levels": levels,
              "overload": overload}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve-cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "serve-cpu.md").write_text(table(result))
    plot(result, RESULTS / "serve-cpu.png")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
