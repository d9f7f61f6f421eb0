"""The caption service as a client sees it: a server process on 127.0.0.1, driven by
tritonclient.http (the Open Inference Protocol's own client) and by plain HTTP. Every server
started here is bounded in time and stopped at the end."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks.serve import Server
from helpers import ROOT
from runtime import Captioner
from runtime.engine import Caption

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


class Stub:
    """A captioner whose forward passes wait until the test lets them go (`release`): what is
    queued, timed out or refused is then decided by events, never by how fast this machine is."""

    manifest = SimpleNamespace(data={"name": "stub"}, prompting=SimpleNamespace(text_inputs={}, tasks=None))
    max_pixels = 10_000_000

    def __init__(self, per_pass: int = 8, fail: Exception | None = None):
        self.release, self.entered, self.per_pass, self.fail, self.seen = threading.Event(), threading.Event(), per_pass, fail, []

    def images_per_pass(self, beams: int) -> int:
        return self.per_pass

    def generation_config(self, **settings):
        return SimpleNamespace(num_beams=1, max_new_tokens=8)

    def caption(self, images, batch_size, **settings):
        self.seen.append(len(images))
        self.entered.set()
        if not self.release.wait(60):
            raise TimeoutError("the test never released the pass")
        if self.fail:
            raise self.fail
        return [Caption(image="Image", text=f"{image.size[0]} wide", tokens=[1]) for image in images]


@contextmanager
def in_process(stub: Stub, **settings):
    """The service app in this process (Starlette's TestClient), over a stub captioner."""
    from starlette.testclient import TestClient

    from runtime.service import ServiceConfig, build_app

    with TestClient(build_app(stub, ServiceConfig(**settings)), raise_server_exceptions=False) as client:
        try:
            yield client
        finally:
            stub.release.set()


def png(width: int = 8) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, 4)).save(buffer, "PNG")
    return buffer.getvalue()


def infer_body(images: list[bytes]) -> bytes:
    return json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                                   "data": [base64.b64encode(i).decode() for i in images]}]}).encode()


def test_a_full_queue_answers_503_with_retry_after():
    """One pass holds an image while three wait: a queue of four has room for one more, so a
    request for two is refused whole, and nothing else is lost."""
    stub = Stub(per_pass=1)
    with in_process(stub, max_queue=4, max_batch=1) as client:
        first = []
        worker = threading.Thread(target=lambda: first.append(client.post("/v2/models/stub/infer",
                                                                           content=infer_body([png()] * 4))))
        worker.start()
        assert stub.entered.wait(30)  # the first image is in its pass; three are queued
        refused = client.post("/v2/models/stub/infer", content=infer_body([png()] * 2))
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        stub.release.set()
        worker.join(timeout=60)
    assert first[0].status_code == 200 and len(first[0].json()["outputs"][0]["data"]) == 4


def test_a_caption_past_the_deadline_is_a_504_and_a_model_failure_names_no_internals(caplog):
    with in_process(Stub(), timeout_s=0.05) as client:
        reply = client.post("/caption", content=png())
        assert reply.status_code == 504 and reply.json() == {"error": "no caption within 0.05 s"}
    stub = Stub(fail=RuntimeError("/opt/models/secret.onnx: bad allocation"))
    stub.release.set()
    with in_process(stub) as client:
        reply = client.post("/caption", content=png())
    assert reply.status_code == 500 and reply.json() == {"error": "internal error; the service log has the details"}
    assert "secret.onnx" in caplog.text  # logged whole, for the operator


def test_bodies_raw_and_multipart_are_capped_and_bad_images_never_reach_the_graphs():
    stub = Stub()
    stub.release.set()
    with in_process(stub, max_body_bytes=10_000) as client:
        reply = client.post("/caption", content=bytes(20_000))
        assert reply.status_code == 413 and "over 10000 bytes" in reply.json()["error"]
        reply = client.post("/caption", files={"image": ("big.png", bytes(20_000), "image/png")})
        assert reply.status_code == 413 and "over 10000 bytes" in reply.json()["error"]
        reply = client.post("/caption", files={"image": ("ok.png", png(12), "image/png")})
        assert reply.status_code == 200 and reply.json()["caption"] == "12 wide"
        reply = client.post("/v2/models/stub/infer", content=infer_body([png(), b"%PDF-1.4"]))
        assert reply.status_code == 400 and reply.json()["error"].startswith("element 1: image: not an image")
    assert stub.seen == [1]  # decoded first: the bad request never took a forward pass


def test_passes_are_counted_as_the_graphs_see_them():
    """Beams take rows: a batch of four images runs as two passes of two, and the metric says so."""
    stub = Stub(per_pass=2)
    stub.release.set()
    with in_process(stub, max_batch=8, max_delay_s=1.0) as client:
        assert client.post("/v2/models/stub/infer", content=infer_body([png()] * 4)).status_code == 200
        metrics = client.get("/metrics").text
    assert stub.seen == [2, 2]
    assert "edgecap_batch_images_count 2.0" in metrics and "edgecap_batch_images_sum 4.0" in metrics


def test_a_body_that_does_not_arrive_is_a_408_and_frees_its_connection():
    with server("--read-timeout-s", "0.5") as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
            slow.sendall(b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + bytes(10))
            reply = b""
            while b"did not arrive" not in reply and (chunk := slow.recv(4096)):  # answered while 990 bytes are owed
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in reply
        assert call(f"{url}/v2/health/ready")[0] == 200


def test_listening_beyond_loopback_needs_a_key_or_a_word():
    r = subprocess.run([sys.executable, "-m", "runtime.serve", "--host", "0.0.0.0"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "EDGECAP_API_KEY": ""})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--allow-unauthenticated" in r.stderr


def passes_started(url: str) -> float:
    metrics = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("edgecap_batch_images_count")))


def test_sigterm_lets_the_request_in_flight_finish(images):
    with server() as (url, proc):
        result = []
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [16],
                            "data": [base64.b64encode(images["chelsea"]).decode()] * 16}]}
        worker = threading.Thread(target=lambda: result.append(
            call(f"{url}/v2/models/{MODEL}/infer", json.dumps(body).encode())))
        worker.start()
        deadline = time.monotonic() + 60
        while passes_started(url) < 1 and time.monotonic() < deadline:  # the request is in its first pass
            time.sleep(0.01)
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


def test_clients_that_leave_mid_body_leave_the_service_answering():
    """Clients that hang up while their bodies trickle in (a load balancer's retries, a phone going
    out of range) are requests without anyone to answer: the service drops them and keeps serving."""
    with server() as (url, _):
        port = int(url.rsplit(":", 1)[1])
        for _ in range(50):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as gone:
                gone.sendall(b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + bytes(10))
        status, reply, _ = call(f"{url}/v2/health/ready")
        assert status == 200
        request = urllib.request.Request(f"{url}/metrics")
        with urllib.request.urlopen(request, timeout=30) as r:
            metrics = r.read().decode()
        assert 'edgecap_requests_total{endpoint="caption",status="400"}' in metrics
