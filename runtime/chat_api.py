"""OpenAI's chat completions, as the service speaks them (`POST /v1/chat/completions`): what a
request asks, read into the engine's terms, and the response and stream chunks written back.
Pure functions; runtime/service.py runs them.

A request is one user message: text parts and exactly one image as an `image_url` data URL (the
server never fetches a URL or opens a path a client names). The package decides what the text
means: a chat model's or a VQA model's question, Florence-2's task (the text starts with one,
e.g. "<OD>" or "<CAPTION_TO_PHRASE_GROUNDING> a dog"), or, for a captioner, nothing (the image
is captioned and a `note` says the text was ignored).
"""

import base64
import binascii
import re
import time
import uuid
from dataclasses import dataclass

from .engine import Caption

DATA_URL = re.compile(r"data:(?:image/[\w.+-]+)?(?:;[\w=.+-]+)*;base64,(.*)", re.DOTALL)
# Settings the request may carry; others (logprobs, tools, response_format, ...) are refused.
ACCEPTED = {"model", "messages", "max_tokens", "max_completion_tokens", "n", "stream", "stream_options", "temperature",
            "top_p", "top_k", "seed", "user"}


class ChatRequestError(ValueError):
    """A chat request the service refuses (400), with the one-line reason."""


@dataclass(frozen=True)
class ChatRequest:
    image: bytes
    text: str
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stream: bool
    include_usage: bool


def number(body: dict, name: str, kind: type):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ChatRequestError(f"{name} must be a {'number' if kind is float else 'whole number'}")
    return kind(value)


def parse_chat(body) -> ChatRequest:
    """The one user message's image and text, and the settings, from a request's JSON."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise ChatRequestError("a chat request is a JSON object with a non-empty messages list")
    if unknown := sorted(set(body) - ACCEPTED):
        raise ChatRequestError(f"unsupported fields {unknown}")
    if body.get("n", 1) != 1:
        raise ChatRequestError("n must be 1")
    messages = body["messages"]
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        raise ChatRequestError("send one user message (text and one image); this model answers one turn, "
                               "without system or earlier messages")
    content = messages[0].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        raise ChatRequestError("message content must be a string or a list of content parts")
    texts, images = [], []
    for part in parts:
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif part.get("type") == "image_url" and isinstance(part.get("image_url"), dict):
            images.append(image_bytes(part["image_url"].get("url")))
        else:
            raise ChatRequestError(f"unsupported content part {str(part.get('type'))[:40]!r}: send text and image_url")
    if len(images) != 1:
        raise ChatRequestError(f"send exactly one image (an image_url part); this message has {len(images)}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(body.get("stream", False), bool):
        raise ChatRequestError("stream must be true or false and stream_options an object")
    max_tokens = number(body, "max_completion_tokens", int)
    return ChatRequest(images[0], " ".join(t.strip() for t in texts if t.strip()),
                       number(body, "max_tokens", int) if max_tokens is None else max_tokens,
                       number(body, "temperature", float), number(body, "top_p", float), number(body, "top_k", int),
                       number(body, "seed", int), body.get("stream", False), bool(options.get("include_usage")))


def image_bytes(url) -> bytes:
    """A data URL's bytes; anything else is refused without being fetched or opened."""
    if not isinstance(url, str):
        raise ChatRequestError("image_url.url must be a string")
    match = DATA_URL.fullmatch(url)
    if match is None:
        what = "a remote URL" if re.match(r"[a-z][a-z0-9+.-]*://", url, re.I) else "not a base64 data URL"
        raise ChatRequestError(f"image_url is {what}: send the image inline as data:image/...;base64,... "
                               "(this server never fetches URLs or opens paths)")
    try:
        return base64.b64decode(match.group(1), validate=True)
    except binascii.Error:
        raise ChatRequestError("image_url's data is not base64") from None


def what_is_asked(text: str, takes: dict[str, bool], tasks: list[str]) -> tuple[dict, str | None]:
    """(Captioner.caption's question/task/text, a note or None) for the message's text, as the
    package reads text (Prompting.text_inputs)."""
    if "task" in takes:
        if not text:
            return {}, None
        task = text.split(">", 1)[0] + ">" if text.startswith("<") else None
        if task not in tasks:
            raise ChatRequestError(f"start the text with one of this model's tasks: {', '.join(tasks)}")
        return {"task": task, "text": text[len(task):].strip() or None}, None
    if "question" in takes:
        return ({"question": text} if text else {}), None
    return {}, "this model captions images; the text was ignored" if text else None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def finish_reason(result: Caption, max_new_tokens: int) -> str:
    """"length" when the answer ran to the token limit, "stop" when the model ended it."""
    return "length" if len(result.tokens) >= max_new_tokens else "stop"


def usage(result: Caption) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.tokens),
            "total_tokens": result.prompt_tokens + len(result.tokens)}


def extras(result: Caption, note: str | None) -> dict:
    """Fields beyond OpenAI's (clients ignore them): Florence-2's parsed answer, a note."""
    return {**({} if result.result is None else {"result": result.result}), **({} if note is None else {"note": note})}


def completion(ident: str, model: str, result: Caption, max_new_tokens: int, note: str | None) -> dict:
    return {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": finish_reason(result, max_new_tokens)}],
            "usage": usage(result), **extras(result, note)}


def chunk(ident: str, model: str, delta: dict, finish: str | None = None, **more) -> dict:
    """One chat.completion.chunk: a delta of the one choice (or no choice, for the usage chunk)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices, **more}
