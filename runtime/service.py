"""The caption service behind `python -m runtime.serve` (the `serve` extra: Starlette, uvicorn,
prometheus_client).

- Open Inference Protocol v2 (KServe/Triton REST): health, model metadata and readiness, and
  `POST /v2/models/{name}/infer` with input `image` (BYTES, one encoded image file per element;
  in JSON, base64 strings) and output `caption` (BYTES), in the JSON encoding or with the
  binary-data extension that `tritonclient.http` uses by default.
- `POST /caption`: one image as the raw body or a multipart upload -> the CLI's JSON record.
- Dynamic batching: concurrent requests share forward passes of up to `max_batch` images,
  gathered for at most `max_delay_s` after the first (`Batcher`).
- Images arrive only as bytes in requests: nothing a client names is opened. They are decoded on
  a pool of threads of their own, so that the thread running the graphs only runs graphs.
- Limits: every body (raw or multipart) capped at `max_body_bytes` while it is read, nothing
  spooled past it (413); a body that does not arrive within `read_timeout_s` is a 408 and frees
  its slot; uvicorn holds at most `max_connections` (runtime.serve). An error the service did not
  foresee is logged whole and answered with one line that names no internals (500).
"""

import asyncio
import base64
import binascii
import hmac
import json
import logging
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .engine import Caption, Captioner
from .preprocess import ImageError, open_image

OPEN = ("/v2/health/live", "/v2/health/ready")  # what load balancers probe: never behind the key
log = logging.getLogger("edgecap.service")


class HTTPError(Exception):
    """A request the service refuses: the status and one line for the client."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


@dataclass(frozen=True)
class ServiceConfig:
    max_batch: int = 8
    max_delay_s: float = 0.005
    max_queue: int = 64
    timeout_s: float = 30.0
    max_body_bytes: int = 32 * 2**20
    read_timeout_s: float = 30.0
    api_key: str | None = None
    decode_threads: int = 2  # decoding a camera JPEG takes ~125 ms of one core


def deserialize_bytes(buffer: bytes) -> list[bytes]:
    """The protocol's BYTES tensor layout: each element is a 4-byte little-endian length, then
    the bytes."""
    items, offset = [], 0
    while offset < len(buffer):
        if offset + 4 > len(buffer):
            raise HTTPError(400, "BYTES tensor data ends inside an element length")
        (size,) = struct.unpack_from("<I", buffer, offset)
        if offset + 4 + size > len(buffer):
            raise HTTPError(400, "BYTES tensor data ends inside an element")
        items.append(buffer[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return items


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def parse_infer(body: bytes, header_length: int | None) -> tuple[dict, dict[str, list[bytes]]]:
    """(request JSON, {input name: elements}) from an infer request in either encoding."""
    head = body[:header_length] if header_length is not None else body
    try:
        request = json.loads(head)
        inputs = request["inputs"]
        if not isinstance(inputs, list):
            raise TypeError("inputs is not a list")
    except (ValueError, KeyError, TypeError) as e:
        raise HTTPError(400, f"malformed inference request: {e}") from None
    binary, offset, tensors = body[len(head):], 0, {}
    for tensor in inputs:
        if not isinstance(tensor, dict) or tensor.get("datatype") != "BYTES" or not isinstance(tensor.get("name"), str):
            raise HTTPError(400, "every input needs a name and datatype BYTES")
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise HTTPError(400, f"input {tensor['name']}: binary_data_size runs past the request body")
            tensors[tensor["name"]] = deserialize_bytes(binary[offset : offset + size])
            offset += size
        else:
            data = tensor.get("data")
            if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
                raise HTTPError(400, f"input {tensor['name']}: data must be a list of base64 strings")
            try:
                tensors[tensor["name"]] = [base64.b64decode(d, validate=True) for d in data]
            except binascii.Error:
                raise HTTPError(400, f"input {tensor['name']}: data is not base64") from None
    return request, tensors


def infer_response(request: dict, model: str, captions: list[str]) -> Response:
    """Output `caption` (BYTES, shape [n]) as JSON, or as binary data where the request asks."""
    params = request.get("parameters") or {}
    wanted = {o.get("name"): (o.get("parameters") or {}) for o in request.get("outputs") or [] if isinstance(o, dict)}
    if wanted and "caption" not in wanted:
        raise HTTPError(400, f"unknown outputs {sorted(wanted)}; this model has: caption")
    binary = wanted.get("caption", {}).get("binary_data", params.get("binary_data_output", False))
    output = {"name": "caption", "datatype": "BYTES", "shape": [len(captions)]}
    head = {"model_name": model, **({"id": request["id"]} if "id" in request else {}), "outputs": [output]}
    if not binary:
        output["data"] = captions
        return JSONResponse(head)
    data = serialize_bytes([c.encode() for c in captions])
    output["parameters"] = {"binary_data_size": len(data)}
    text = json.dumps(head).encode()
    return Response(text + data, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(text))})


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("edgecap_requests", "Requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("edgecap_request_seconds", "Request latency", ["endpoint"], registry=self.registry)
        self.batch = Histogram("edgecap_batch_images", "Images per forward pass", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64))
        self.queue = Gauge("edgecap_queue_depth", "Images waiting for a forward pass", registry=self.registry)


class QueueFull(Exception):
    pass


class Batcher:
    """Coalesces concurrent images (decoded already) into forward passes on one worker thread (the
    captioner's sessions use the cores; two passes at once would only share them)."""

    def __init__(self, captioner: Captioner, cfg: ServiceConfig, metrics: Metrics):
        self.captioner, self.cfg, self.metrics = captioner, cfg, metrics
        self.queue: asyncio.Queue = asyncio.Queue(cfg.max_queue)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="caption")

    def caption(self, images: list) -> list[Caption]:
        """One batch, in forward passes as the graphs see them (beams take rows: fewer images per
        pass), each counted in edgecap_batch_images."""
        per_pass = self.captioner.images_per_pass(self.captioner.generation_config().num_beams)
        results = []
        for start in range(0, len(images), per_pass):
            chunk = images[start : start + per_pass]
            self.metrics.batch.observe(len(chunk))
            results += self.captioner.caption(chunk, batch_size=len(chunk))
        return results

    def submit(self, images: list) -> list[asyncio.Future]:
        """Futures of the images' Captions, all queued or none (QueueFull)."""
        if self.queue.maxsize - self.queue.qsize() < len(images):
            raise QueueFull
        futures = []
        for image in images:
            futures.append(asyncio.get_running_loop().create_future())
            self.queue.put_nowait((image, futures[-1]))
        self.metrics.queue.set(self.queue.qsize())
        return futures

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.cfg.max_delay_s
            while len(batch) < self.cfg.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            self.metrics.queue.set(self.queue.qsize())
            batch = [(image, future) for image, future in batch if not future.done()]  # skip timed-out requests
            if not batch:
                continue
            caption = partial(self.caption, [image for image, _ in batch])
            try:
                results = await loop.run_in_executor(self.worker, caption)
            except Exception as e:  # the model failed, not the request: every waiter gets it
                results = [e] * len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    (future.set_exception if isinstance(result, Exception) else future.set_result)(result)


def build_app(captioner: Captioner, cfg: ServiceConfig) -> Starlette:
    model = captioner.manifest.data["name"]
    metrics = Metrics()
    batcher = Batcher(captioner, cfg, metrics)
    decoders = ThreadPoolExecutor(max(1, cfg.decode_threads), thread_name_prefix="decode")

    async def decode(images: list[bytes]) -> list:
        """Each image decoded (to an upright RGB image) on the decoding threads; a bad one is a 400
        naming it, before anything is queued."""
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(*(loop.run_in_executor(decoders, safe_open, image, captioner.max_pixels)
                                         for image in images))
        bad = [(i, d) for i, d in enumerate(decoded) if isinstance(d, ImageError)]
        if bad:  # the protocol has no partial results: the request is refused, naming the element
            raise HTTPError(400, str(bad[0][1]) if len(images) == 1 else f"element {bad[0][0]}: {bad[0][1]}")
        return decoded

    async def caption_images(images: list[bytes]) -> list[Caption]:
        if not images:
            raise HTTPError(400, "no images in the request")
        if len(images) > cfg.max_queue:  # would never fit: no use retrying
            raise HTTPError(413, f"{len(images)} images in one request; the queue holds {cfg.max_queue}")
        # decode_threads 0 decodes on the graphs' thread, as the service did before (benchmarks.serve --camera)
        decoded = await decode(images) if cfg.decode_threads else images
        try:
            futures = batcher.submit(decoded)
        except QueueFull:
            raise HTTPError(503, f"queue full ({cfg.max_queue} images waiting)", {"Retry-After": "1"}) from None
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures), cfg.timeout_s)
        except TimeoutError:
            raise HTTPError(504, f"no caption within {cfg.timeout_s:g} s") from None
        bad = [(i, r.error) for i, r in enumerate(results) if r.error]
        if bad:  # e.g. a chat model's image whose tiles make too long a prompt
            raise HTTPError(400, bad[0][1] if len(images) == 1 else f"element {bad[0][0]}: {bad[0][1]}")
        return results

    async def read_body(request: Request) -> bytes:
        """The whole body, capped while it arrives, within the read timeout."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise HTTPError(413, f"request body over {cfg.max_body_bytes} bytes")
        body = bytearray()

        async def receive():
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > cfg.max_body_bytes:
                    raise HTTPError(413, f"request body over {cfg.max_body_bytes} bytes")

        try:
            await asyncio.wait_for(receive(), cfg.read_timeout_s)
        except TimeoutError:
            raise HTTPError(408, f"the request body did not arrive within {cfg.read_timeout_s:g} s") from None
        return bytes(body)

    async def uploaded_file(request: Request) -> bytes:
        """The one file of a multipart upload, parsed from a body read as any other (capped, timed):
        nothing is spooled to disk beyond the cap."""
        body = await read_body(request)

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        async with Request(request.scope, replay).form(max_files=1, max_part_size=cfg.max_body_bytes) as form:
            files = [v for v in form.values() if hasattr(v, "read")]
            if len(files) != 1:
                raise HTTPError(400, "send one file in the multipart form")
            return await files[0].read()

    def check_model(name: str) -> None:
        if name != model:
            raise HTTPError(404, f"unknown model {name!r}; this server has {model!r}")

    async def live(request):
        return JSONResponse({"live": True})

    async def ready(request):
        return JSONResponse({"ready": True})

    async def model_ready(request):
        check_model(request.path_params["model"])
        return JSONResponse({"name": model, "ready": True})

    async def metadata(request):
        check_model(request.path_params["model"])
        return JSONResponse({"name": model, "versions": ["1"], "platform": "onnxruntime",
                             "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
                             "outputs": [{"name": "caption", "datatype": "BYTES", "shape": [-1]}]})

    async def infer(request):
        check_model(request.path_params["model"])
        header = request.headers.get("inference-header-content-length")
        if header is not None and not header.isdigit():
            raise HTTPError(400, "Inference-Header-Content-Length is not a number")
        body = await read_body(request)
        parsed, tensors = parse_infer(body, int(header) if header is not None else None)
        unknown = sorted(set(tensors) - {"image"})
        if unknown or "image" not in tensors:
            raise HTTPError(400, f"inputs {sorted(tensors)}: this model takes exactly one input, image")
        results = await caption_images(tensors["image"])
        return infer_response(parsed, model, [r.text for r in results])

    async def caption(request):
        multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
        body = await (uploaded_file(request) if multipart else read_body(request))
        result = (await caption_images([body]))[0]
        return JSONResponse({"caption": result.text, "tokens": result.tokens, "ms": round(result.ms, 1)})

    async def prometheus(request):
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [Route("/v2/health/live", live), Route("/v2/health/ready", ready),
              Route("/v2/models/{model}", metadata), Route("/v2/models/{model}/ready", model_ready),
              Route("/v2/models/{model}/infer", infer, methods=["POST"]),
              Route("/caption", caption, methods=["POST"]), Route("/metrics", prometheus)]

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.worker.shutdown(wait=True)
        decoders.shutdown(wait=True)

    async def refused(request, e: HTTPError):
        return JSONResponse({"error": str(e)}, e.status, headers=e.headers)

    async def failed(request, e: Exception):  # a bug or a model failure: logged whole, one line out naming nothing
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return JSONResponse({"error": "internal error; the service log has the details"}, 500)

    async def guard(request: Request, call_next):
        """The API key before any handler; requests counted by endpoint and status."""
        start, endpoint = time.perf_counter(), endpoint_label(request.url.path)
        given = request.headers.get("authorization", "")
        if cfg.api_key and request.url.path not in OPEN and not hmac.compare_digest(
                given.encode(), f"Bearer {cfg.api_key}".encode()):
            response = await refused(request, HTTPError(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                                        {"WWW-Authenticate": "Bearer"}))
        else:
            response = await call_next(request)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return response

    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPError: refused, Exception: failed},
                     middleware=[Middleware(BaseHTTPMiddleware, dispatch=guard)])


def safe_open(image: bytes, max_pixels: int):
    """An upright RGB image, or the ImageError to report (returned: one bad image must not fail gather)."""
    try:
        return open_image(image, max_pixels)
    except ImageError as e:
        return e


def endpoint_label(path: str) -> str:
    """A bounded label set: whatever path a client sends, metrics name one of these."""
    if path.startswith("/v2/health/"):
        return "health"
    if path.startswith("/v2/models/"):
        return {"infer": "infer", "ready": "model_ready"}.get(path.rsplit("/", 1)[-1], "model_metadata")
    return {"/caption": "caption", "/metrics": "metrics"}.get(path, "other")
