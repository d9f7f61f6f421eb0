"""python -m benchmarks.serve [--model PKG] [--levels 1 4 16 64] [--requests N] [--threads N] [--rounds N]
python -m benchmarks.serve --slow 200 [--rounds N]      python -m benchmarks.serve --camera [--rounds N]

Load on the caption service: `python -m runtime.serve` in its own process on 127.0.0.1, closed-loop
clients (each sends its next request when the last one is answered) at each concurrency level, a
fixed number of requests per level, every request one real photo (export/heldout) through
`POST /caption`. Reports images/s, p50/p90/p99 latency, errors by status, forward passes and
images per pass (from the server's /metrics), and the server's RSS before and after. The comparison
with captioning in this process is interleaved: rounds of (the photos one at a time, the photos in
batches of --max-batch, the service at --compare clients), medians of the rates and of the per-round
ratios, so that drift of the machine's speed falls on both sides. Then an overload run (concurrency 64 against a queue of 16): only 503s beyond the queue, and
every caption that comes back is its own image's. Writes benchmarks/results/serve-cpu.{json,md,png}.

--slow N: the service under N slow clients, each sending a request body one byte every 100 ms (and
again once the service gives up on it with a 408), while --compare normal clients run: rounds
alternate without and with them; the normal clients' images/s, p99 and errors, and the server's
RSS, into serve-slow-cpu.{json,md}.
--camera: 12-megapixel JPEGs from --compare clients, images decoded on the service's decoding
threads vs on the graphs' thread (--decode-threads 0), rounds alternating, into serve-camera-cpu.{json,md}.
"""

import argparse
import http.client
import io
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


def trickle(port: int, stop: threading.Event, opened: list) -> None:
    """A slow client: a request whose body comes one byte every 100 ms; when the service gives up
    on it (408, connection closed), another, until `stop`."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
                conn.sendall(b"POST /caption HTTP/1.1\r\nHost: edgecap\r\nContent-Length: 100000\r\n\r\n")
                opened.append(1)
                while not stop.wait(0.1):
                    conn.sendall(b"\0")
        except OSError:  # answered and closed by the service
            continue


def slow_clients(args, images: list[bytes], expected: list[str], common: list[str]) -> dict:
    """Normal clients alone and beside `args.slow` trickling ones, rounds alternating; medians."""
    server = Server(common + ["--max-queue", "256", "--max-connections", str(4 * args.slow)])
    try:
        load(server.port, images, expected, args.compare, 64)  # warm-up
        rss_before, rss_peak, runs = rss_mib(server.proc.pid), 0.0, {"alone": [], "beside slow clients": []}
        for _ in range(args.rounds):
            runs["alone"].append(load(server.port, images, expected, args.compare, args.requests))
            stop, opened = threading.Event(), []
            slow = [threading.Thread(target=trickle, args=(server.port, stop, opened)) for _ in range(args.slow)]
            for t in slow:
                t.start()
            while len(opened) < args.slow:  # every slow client holds a connection before the normal ones start
                stop.wait(0.05)
            runs["beside slow clients"].append(load(server.port, images, expected, args.compare, args.requests))
            rss_peak = max(rss_peak, rss_mib(server.proc.pid))  # with every slow client still connected
            stop.set()
            for t in slow:
                t.join(timeout=120)
    finally:
        server.stop()
    median = {name: {key: round(float(np.median([r[key] for r in rs])), 1) for key in ("images_per_s", "p50_ms", "p99_ms")}
              for name, rs in runs.items()}
    errors = {name: sum(sum(v for k, v in r["statuses"].items() if k != 200) + r["wrong_captions"] for r in rs)
              for name, rs in runs.items()}
    return {"slow_clients": args.slow, "normal_clients": args.compare, "rounds": args.rounds, "requests": args.requests,
            "median": median, "errors": errors, "rss_mib_before": round(rss_before, 1),
            "rss_mib_with_slow": round(rss_peak, 1),
            "images_per_s_ratio": round(median["beside slow clients"]["images_per_s"] / median["alone"]["images_per_s"], 3),
            "p99_ratio": round(median["beside slow clients"]["p99_ms"] / median["alone"]["p99_ms"], 3)}


def camera_photos() -> list[bytes]:
    """12-megapixel JPEGs (4000 x 3000, quality 90) made from the held-out photos."""
    from PIL import Image

    out = []
    for path in heldout_photos()[:8]:
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def camera(args, common: list[str]) -> dict:
    """Camera-size photos from `args.compare` clients: decoded on decoding threads vs on the graphs' thread."""
    photos = camera_photos()
    expected = [c.text for c in Captioner(args.model, provider="cpu").caption(photos)]
    servers = {"decoding threads (2)": Server(common + ["--max-queue", "256"]),
               "on the graphs' thread": Server(common + ["--max-queue", "256", "--decode-threads", "0"])}
    try:
        runs = {name: [] for name in servers}
        for name, server in servers.items():
            load(server.port, photos, expected, args.compare, 16)  # warm-up
        for _ in range(args.rounds):
            for name, server in servers.items():
                runs[name].append(load(server.port, photos, expected, args.compare, 48))
    finally:
        for server in servers.values():
            server.stop()
    return {"clients": args.compare, "rounds": args.rounds, "photo": "4000 x 3000 JPEG, quality 90",
            **{name: {key: round(float(np.median([r[key] for r in rs])), 2) for key in ("images_per_s", "p50_ms", "p99_ms")}
               | {"errors": sum(sum(v for k, v in r["statuses"].items() if k != 200) + r["wrong_captions"] for r in rs)}
               for name, rs in runs.items()}}


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
    parser.add_argument("--slow", type=int, default=0, help="measure N slow clients beside the normal ones, alone")
    parser.add_argument("--camera", action="store_true", help="measure camera-size photos' decoding, alone")
    args = parser.parse_args(argv)
    images = [p.read_bytes() for p in heldout_photos()]
    captioner = Captioner(args.model, provider="cpu", threads=args.threads)
    expected = [c.text for c in captioner.caption(images, batch_size=1)]
    common = ["--provider", "cpu", "--threads", str(args.threads), "--max-batch", str(args.max_batch),
              "--max-delay-ms", str(args.max_delay_ms), *(["--model", str(args.model)] if args.model else [])]
    if args.slow or args.camera:
        name, result = ("serve-slow-cpu", slow_clients(args, images, expected, common)) if args.slow else \
            ("serve-camera-cpu", camera(args, common))
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / f"{name}.md").write_text("```json\n" + json.dumps(result, indent=1) + "\n```\n")
        print(json.dumps(result, indent=1))
        return 0
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
