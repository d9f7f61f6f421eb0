"""The caption service as a client sees it: a server process on 127.0.0.1, driven by
tritonclient.http (the Open Inference Protocol's own client) and by plain HTTP. Every server
started here is bounded in time and stopped at the end."""

import base64
import io
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import numpy as np
import pytest

from benchmarks.serve import Server
from helpers import ROOT
from runtime import Captioner

MODEL = "efficientnet-lite0-concept-captioner"
KEY = "test-key"


@contextmanager
def server(*args):
    """The service on a free loopback port (benchmarks.serve.Server); yields its URL and process."""
    running = Server(["--provider", "cpu", *args])
    try:
        yield f"http://127.0.0.1:{running.port}", running.proc
    finally:
        running.stop()


def call(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request, errors included."""
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


@pytest.fixture(scope="module")
def images(photo_paths, generated_paths) -> dict[str, bytes]:
    paths = {**photo_paths, **generated_paths}
    return {name: paths[name].read_bytes() for name in ("chelsea", "coffee", "astronaut", "rocket", "shapes", "gradient")}


@pytest.fixture(scope="module")
def expected(photo_paths, generated_paths) -> dict[str, str]:
    """What the CLI says for the same files (the int8 CPU default, in-process)."""
    paths = {**photo_paths, **generated_paths}
    names = ["chelsea", "coffee", "astronaut", "rocket", "shapes", "gradient"]
    return {n: c.text for n, c in zip(names, Captioner(provider="cpu").caption([paths[n] for n in names]))}


@pytest.fixture(scope="module")
def keyed():
    # A long batching window, so that concurrent requests share forward passes.
    with server("--api-key", KEY, "--max-delay-ms", "100") as running:
        yield running


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_tritonclient_gets_the_clis_captions(keyed, images, expected):
    import tritonclient.http as triton

    url, _ = keyed
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    auth = dict(AUTH)  # tritonclient adds its request headers to the dict it is given
    assert client.is_server_live() and client.is_model_ready(MODEL, headers=auth)
    assert client.get_model_metadata(MODEL, headers=auth)["outputs"][0]["name"] == "caption"
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(list(images.values()), dtype=object))  # binary-data extension
    for outputs in (None, [triton.InferRequestedOutput("caption", binary_data=False)]):
        got = client.infer(MODEL, [tensor], outputs=outputs, headers=auth).as_numpy("caption")
        assert [c.decode() if isinstance(c, bytes) else c for c in got] == list(expected.values())


def test_json_encoding_and_the_caption_endpoint(keyed, images, expected):
    url, _ = keyed
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                        "data": [base64.b64encode(images[n]).decode() for n in ("chelsea", "coffee")]}]}
    status, reply, _ = call(f"{url}/v2/models/{MODEL}/infer", json.dumps(body).encode(), AUTH)
    assert status == 200 and reply["outputs"][0]["data"] == [expected["chelsea"], expected["coffee"]], reply
    status, reply, _ = call(f"{url}/caption", images["rocket"], AUTH)
    assert status == 200 and reply["caption"] == expected["rocket"] and reply["tokens"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_caption(keyed, images, expected):
    url, _ = keyed
    order = list(images) * 3
    results = [None] * len(order)

    def one(i):
        results[i] = call(f"{url}/caption", images[order[i]], AUTH)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(order))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [(s, r["caption"]) for s, r, _ in results] == [(200, expected[n]) for n in order]
    metrics = urllib.request.urlopen(urllib.request.Request(f"{url}/metrics", headers=AUTH), timeout=10).read().decode()
    passes = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("edgecap_batch_images_count")))
    assert passes < len(order)  # fewer forward passes than requests: they were coalesced


def test_refusals_are_one_line_json_with_their_status(keyed, images):
    url, _ = keyed
    infer = f"{url}/v2/models/{MODEL}/infer"
    assert call(f"{url}/v2/health/ready")[0] == 200  # probes need no key
    status, reply, headers = call(f"{url}/caption", images["chelsea"])
    assert status == 401 and headers["www-authenticate" if "www-authenticate" in headers else "WWW-Authenticate"]
    assert call(f"{url}/caption", images["chelsea"], {"Authorization": "Bearer wrong"})[0] == 401
    status, reply, _ = call(f"{url}/caption", b"%PDF-1.4 not an image", AUTH)
    assert status == 400 and reply["error"].startswith("image: not an image in a supported format")
    mixed = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                         "data": [base64.b64encode(images["chelsea"]).decode(), base64.b64encode(b"GIF89a").decode()]}]}
    status, reply, _ = call(infer, json.dumps(mixed).encode(), AUTH)
    assert status == 400 and reply["error"].startswith("element 1: image: ")
    assert call(f"{url}/v2/models/other/infer", b"{}", AUTH)[0] == 404
    for bad in (b"{", b'{"inputs": 3}', b'{"inputs": [{"name": "image", "datatype": "FP32", "data": [1]}]}',
                b'{"inputs": [{"name": "image", "datatype": "BYTES", "data": ["***"]}]}',
                b'{"inputs": [{"name": "text", "datatype": "BYTES", "data": []}]}'):
        status, reply, _ = call(infer, bad, AUTH)
        assert status == 400 and "\n" not in reply["error"], bad


def test_deadline_and_size_limits():
    with server("--max-queue", "1", "--max-body-mib", "0.01", "--timeout-s", "0.001") as (url, _):
        assert call(f"{url}/caption", (ROOT / "runtime/samples/coffee.jpg").read_bytes()[:5000])[0] == 504
        status, reply, _ = call(f"{url}/caption", bytes(20_000))
        assert status == 413 and "over" in reply["error"]
        two = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["AA==", "AA=="]}]}
        status, reply, _ = call(f"{url}/v2/models/{MODEL}/infer", json.dumps(two).encode())
        assert status == 413 and reply["error"] == "2 images in one request; the queue holds 1"


def test_a_full_queue_answers_503_with_retry_after():
    """Four 12-megapixel images fill a queue of four while the worker decodes them one at a time
    (a few hundred ms); a request for two more meanwhile is refused, and nothing else is lost."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((4000, 3000)).convert("RGB").save(buffer, "JPEG")
    big = base64.b64encode(buffer.getvalue()).decode()
    with server("--max-queue", "4", "--max-batch", "1") as (url, _):
        infer = f"{url}/v2/models/{MODEL}/infer"
        first = []
        worker = threading.Thread(target=lambda: first.append(call(infer, json.dumps(
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [4], "data": [big] * 4}]}).encode())))
        worker.start()
        time.sleep(0.15)
        status, reply, headers = call(infer, json.dumps(
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [big] * 2}]}).encode())
        worker.join(timeout=60)
        assert status == 503 and headers.get("retry-after", headers.get("Retry-After")) == "1", reply
        assert first[0][0] == 200 and len(first[0][1]["outputs"][0]["data"]) == 4


def test_sigterm_lets_the_request_in_flight_finish(images):
    with server() as (url, proc):
        result = []
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [16],
                            "data": [base64.b64encode(images["chelsea"]).decode()] * 16}]}
        worker = threading.Thread(target=lambda: result.append(
            call(f"{url}/v2/models/{MODEL}/infer", json.dumps(body).encode())))
        worker.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        worker.join(timeout=60)
        assert result[0][0] == 200 and len(result[0][1]["outputs"][0]["data"]) == 16
        # uvicorn re-raises the signal once it has drained: the exit says SIGTERM, not a crash.
        assert proc.wait(timeout=30) == -signal.SIGTERM
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"{url}/v2/health/live", timeout=2)


def test_without_the_serve_extra_the_entry_point_says_so():
    code = ("import sys; sys.modules['uvicorn'] = None; from runtime.serve import main; sys.exit(main([]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: python -m runtime.serve needs the serve extra")
