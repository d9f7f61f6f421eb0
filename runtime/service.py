"""The caption service behind `python -m runtime.serve` (the `serve` extra: Starlette, uvicorn,
prometheus_client).

- Open Inference Protocol v2 (KServe/Triton REST): health, model metadata and readiness, and
  `POST /v2/models/{name}/infer` with input `image` (BYTES, one encoded image file per element;
  in JSON, base64 strings) and output `caption` (BYTES), in the JSON encoding or with the
  binary-data extension that `tritonclient.http` uses by default.
  Optional BYTES inputs `question`, `task` and `text` (one element for the request or one per
  image), as the package takes them (Prompting.text_inputs); output `result` (each image's structured
  answer as JSON: Florence-2's boxes and polygons in the original image's pixels) for a package
  with tasks.
- OpenAI's chat completions (`POST /v1/chat/completions`, `GET /v1/models`; runtime/openai.py):
  one user message with text and one image as a data URL, `stream` as server-sent events.
- `POST /caption`: one image as the raw body or a multipart upload -> the CLI's JSON record;
  `?question=`, `?task=`, `?text=` as the CLI's options.
- Dynamic batching: concurrent requests asking the same thing (`Ask`) share forward passes of up
  to `max_batch` images, gathered for at most `max_delay_s` after the first (`Batcher`). A streamed
  answer runs alone on the same worker, token by token.
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
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from functools import partial

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .chat_api import (ChatRequestError, chunk, completion, completion_id, extras, finish_reason, parse_chat, usage,
                       what_is_asked)
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


def infer_response(request: dict, model: str, outputs: dict[str, list[str]]) -> Response:
    """The outputs the request names (all by default), each BYTES of shape [n], as JSON or as
    binary data where the request asks (per output, or `binary_data_output` for all)."""
    params = request.get("parameters") or {}
    wanted = {o.get("name"): (o.get("parameters") or {}) for o in request.get("outputs") or [] if isinstance(o, dict)}
    if unknown := sorted(set(wanted) - set(outputs)):
        raise HTTPError(400, f"unknown outputs {unknown}; this model has: {', '.join(outputs)}")
    head = {"model_name": model, **({"id": request["id"]} if "id" in request else {}), "outputs": []}
    binary_data = b""
    for name in wanted or outputs:
        output = {"name": name, "datatype": "BYTES", "shape": [len(outputs[name])]}
        if wanted.get(name, {}).get("binary_data", params.get("binary_data_output", False)):
            data = serialize_bytes([v.encode() for v in outputs[name]])
            output["parameters"] = {"binary_data_size": len(data)}
            binary_data += data
        else:
            output["data"] = outputs[name]
        head["outputs"].append(output)
    if not binary_data:
        return JSONResponse(head)
    text = json.dumps(head).encode()
    return Response(text + binary_data, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(text))})


@dataclass(frozen=True)
class Ask:
    """What an image is asked and how its answer is generated (Captioner.caption's settings):
    images with equal Asks share forward passes."""

    question: str | None = None
    task: str | None = None
    text: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None


def infer_asks(tensors: dict[str, list[bytes]], takes: dict[str, bool], n: int) -> list[Ask]:
    """Each image's Ask from an infer request's text inputs: one element for the request or one per
    image; a missing required input, or one the package does not take, is a 400."""
    if unknown := sorted(set(tensors) - {"image", *takes}):
        raise HTTPError(400, f"unknown inputs {unknown}; this model takes: {', '.join(['image', *takes])}")
    if missing := [name for name, required in takes.items() if required and name not in tensors]:
        raise HTTPError(400, f"input {missing[0]} is required by this model")
    columns = {}
    for name in set(tensors) - {"image"}:
        if len(tensors[name]) not in (1, n):
            raise HTTPError(400, f"input {name} has {len(tensors[name])} elements; send 1 or one per image ({n})")
        try:
            columns[name] = [v.decode() for v in tensors[name]] * (n // len(tensors[name]))
        except UnicodeDecodeError:
            raise HTTPError(400, f"input {name} is not UTF-8 text") from None
    return [Ask(**{name: values[i] for name, values in columns.items()}) for i in range(n)]


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

    def caption(self, images: list, ask: Ask) -> list[Caption]:
        """Images asked the same, in forward passes as the graphs see them (beams take rows: fewer
        images per pass), each counted in edgecap_batch_images."""
        settings = asdict(ask)
        per_pass = self.captioner.images_per_pass(self.captioner.generation_config(**settings).num_beams)
        results = []
        for start in range(0, len(images), per_pass):
            chunk = images[start : start + per_pass]
            self.metrics.batch.observe(len(chunk))
            results += self.captioner.caption(chunk, batch_size=len(chunk), **settings)
        return results

    def submit(self, images: list, asks: list[Ask]) -> list[asyncio.Future]:
        """Futures of the images' Captions, all queued or none (QueueFull)."""
        if self.queue.maxsize - self.queue.qsize() < len(images):
            raise QueueFull
        futures = []
        for image, ask in zip(images, asks, strict=True):
            futures.append(asyncio.get_running_loop().create_future())
            self.queue.put_nowait((image, ask, futures[-1]))
        self.metrics.queue.set(self.queue.qsize())
        return futures

    async def stream(self, image, ask: Ask) -> AsyncIterator[str | Caption]:
        """One image's answer as text pieces (Captioner.stream) generated on the worker, between
        batches; its Caption last. An error before the first piece (a prompt too long) is raised
        from the first step. If the consumer stops early, generation stops at the next piece."""
        loop, pieces, stop = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def work():
            generator = self.captioner.stream(image, **asdict(ask))
            try:
                while not stop.is_set():
                    loop.call_soon_threadsafe(pieces.put_nowait, next(generator))
            except StopIteration as end:
                loop.call_soon_threadsafe(pieces.put_nowait, end.value)
            except Exception as e:  # noqa: BLE001 - handed to the request, which reports it
                loop.call_soon_threadsafe(pieces.put_nowait, e)

        loop.run_in_executor(self.worker, work)
        try:
            while True:
                item = await pieces.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if isinstance(item, Caption):
                    return
        finally:
            stop.set()

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
            groups = {}  # images asked the same, in arrival order; timed-out requests skipped
            for image, ask, future in batch:
                if not future.done():
                    groups.setdefault(ask, []).append((image, future))
            for ask, members in groups.items():
                caption = partial(self.caption, [image for image, _ in members], ask)
                try:
                    results = await loop.run_in_executor(self.worker, caption)
                except Exception as e:  # the model failed, not the request: every waiter gets it
                    results = [e] * len(members)
                for (_, future), result in zip(members, results):
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

    def check_ask(ask: Ask):
        """The Ask's generation settings, or a 400 with the reason (a question this model does not
        take, a task without its text, max tokens beyond the model's positions)."""
        try:
            return captioner.generation_config(**asdict(ask))
        except ValueError as e:
            raise HTTPError(400, str(e)) from None

    async def caption_images(images: list[bytes], asks: list[Ask]) -> list[Caption]:
        if not images:
            raise HTTPError(400, "no images in the request")
        if len(images) > cfg.max_queue:  # would never fit: no use retrying
            raise HTTPError(413, f"{len(images)} images in one request; the queue holds {cfg.max_queue}")
        for ask in set(asks):
            check_ask(ask)
        # decode_threads 0 decodes on the graphs' thread, as the service did before (benchmarks.serve --camera)
        decoded = await decode(images) if cfg.decode_threads else images
        try:
            futures = batcher.submit(decoded, asks)
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
            async for part in request.stream():
                body.extend(part)
                if len(body) > cfg.max_body_bytes:
                    raise HTTPError(413, f"request body over {cfg.max_body_bytes} bytes")

        try:
            await asyncio.wait_for(receive(), cfg.read_timeout_s)
        except TimeoutError:
            raise HTTPError(408, f"the request body did not arrive within {cfg.read_timeout_s:g} s") from None
        except ClientDisconnect:  # gone mid-body: nobody to answer, nothing to log as a failure
            raise HTTPError(400, "the client disconnected before its body arrived") from None
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

    takes = captioner.manifest.prompting.text_inputs
    outputs = ["caption", *(["result"] if captioner.manifest.prompting.tasks is not None else [])]

    async def metadata(request):
        check_model(request.path_params["model"])
        tensor = {"datatype": "BYTES", "shape": [-1]}
        inputs = [{"name": "image", **tensor, "parameters": {"required": True}}] + [
            {"name": name, **tensor, "parameters": {"required": required}} for name, required in takes.items()]
        return JSONResponse({"name": model, "versions": ["1"], "platform": "onnxruntime", "inputs": inputs,
                             "outputs": [{"name": name, **tensor} for name in outputs]})

    async def infer(request):
        check_model(request.path_params["model"])
        header = request.headers.get("inference-header-content-length")
        if header is not None and not header.isdigit():
            raise HTTPError(400, "Inference-Header-Content-Length is not a number")
        body = await read_body(request)
        parsed, tensors = parse_infer(body, int(header) if header is not None else None)
        if "image" not in tensors:
            raise HTTPError(400, f"inputs {sorted(tensors)}: input image is required")
        results = await caption_images(tensors["image"], infer_asks(tensors, takes, len(tensors["image"])))
        answers = {"caption": [r.text for r in results], "result": [json.dumps(r.result) for r in results]}
        return infer_response(parsed, model, {name: answers[name] for name in outputs})

    async def caption(request):
        ask = Ask(**{k: v for k, v in request.query_params.items() if k in ("question", "task", "text")})
        if unknown := sorted(set(request.query_params) - set(takes)):
            raise HTTPError(400, f"unknown parameters {unknown}; this model takes: {', '.join(takes) or 'none'}")
        multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
        body = await (uploaded_file(request) if multipart else read_body(request))
        r = (await caption_images([body], [ask]))[0]
        asked = {k: v for k, v in (("question", r.question), ("task", r.task)) if v is not None}
        return JSONResponse({**asked, "caption": r.text, **({} if r.result is None else {"result": r.result}),
                             "tokens": r.tokens, "ms": round(r.ms, 1)})

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model", "created": 0,
                                                         "owned_by": "edgecap"}]})

    async def chat_completions(request):
        body = await read_body(request)
        try:
            given = json.loads(body)
            chat = parse_chat(given)
            asked, note = what_is_asked(chat.text, takes, list((captioner.manifest.prompting.tasks or {}).get("prompts", {})))
        except (ValueError, ChatRequestError) as e:  # json's errors are ValueErrors too
            raise HTTPError(400, str(e).splitlines()[0]) from None
        if given.get("model", model) != model:
            raise HTTPError(404, f"unknown model {str(given['model'])[:80]!r}; this server has {model!r}")
        ask = Ask(**asked, max_new_tokens=chat.max_tokens, temperature=chat.temperature, top_p=chat.top_p,
                  top_k=chat.top_k, seed=chat.seed)
        limit, ident = check_ask(ask).max_new_tokens, completion_id()
        if not chat.stream:
            result = (await caption_images([chat.image], [ask]))[0]
            return JSONResponse(completion(ident, model, result, limit, note))
        image = (await decode([chat.image]))[0]
        metrics.batch.observe(1)
        pieces = batcher.stream(image, ask)
        try:  # before the first piece, errors are still statuses
            first = await asyncio.wait_for(anext(pieces), cfg.timeout_s)
        except TimeoutError:
            await pieces.aclose()
            raise HTTPError(504, f"no answer began within {cfg.timeout_s:g} s") from None
        except ImageError as e:
            raise HTTPError(400, str(e)) from None

        async def events():
            item = first
            try:
                yield server_event(chunk(ident, model, {"role": "assistant", "content": ""}))
                while not isinstance(item, Caption):
                    yield server_event(chunk(ident, model, {"content": item}))
                    item = await anext(pieces)
                yield server_event(chunk(ident, model, {}, finish_reason(item, limit), **extras(item, note)))
                if chat.include_usage:
                    yield server_event(chunk(ident, model, None, usage=usage(item)))
            except Exception as e:  # the status is sent: the stream ends with OpenAI's error event
                log.error("streamed answer failed", exc_info=e)
                yield server_event({"error": {"message": "internal error; the service log has the details",
                                              "type": "server_error"}})
            finally:
                await pieces.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def prometheus(request):
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [Route("/v2/health/live", live), Route("/v2/health/ready", ready),
              Route("/v2/models/{model}", metadata), Route("/v2/models/{model}/ready", model_ready),
              Route("/v2/models/{model}/infer", infer, methods=["POST"]),
              Route("/caption", caption, methods=["POST"]), Route("/metrics", prometheus),
              Route("/v1/models", models), Route("/v1/chat/completions", chat_completions, methods=["POST"])]

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.worker.shutdown(wait=True)
        decoders.shutdown(wait=True)

    async def refused(request, e: HTTPError):
        return JSONResponse(error_body(request.url.path, str(e), e.status), e.status, headers=e.headers)

    async def failed(request, e: Exception):  # a bug or a model failure: logged whole, one line out naming nothing
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return JSONResponse(error_body(request.url.path, "internal error; the service log has the details", 500), 500)

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


def error_body(path: str, message: str, status: int) -> dict:
    """The one-line reason, in OpenAI's error object on its routes (what its clients read)."""
    if path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind, "code": status}}
    return {"error": message}


def server_event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def endpoint_label(path: str) -> str:
    """A bounded label set: whatever path a client sends, metrics name one of these."""
    if path.startswith("/v2/health/"):
        return "health"
    if path.startswith("/v2/models/"):
        return {"infer": "infer", "ready": "model_ready"}.get(path.rsplit("/", 1)[-1], "model_metadata")
    return {"/caption": "caption", "/metrics": "metrics", "/v1/chat/completions": "chat_completions",
            "/v1/models": "models"}.get(path, "other")
