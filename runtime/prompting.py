"""Every prompt a package is given, built in one place (Prompter) from its manifest's `prompting`
section and its tokenizer.

Chat prompts, for the LLM-based families (prompting input "chat"): the checkpoint's own
chat template, rendered with jinja2 the way transformers' apply_chat_template renders it (a
sandbox, trim_blocks, lstrip_blocks, loop controls, its tojson and raise_exception), then each
image placeholder of the text laid out as the family's processor lays it out, then tokenized
with the package's tokenizer (special tokens added as the processor adds them)."""

import json
from functools import lru_cache

import jinja2
import numpy as np
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from .manifest import Manifest


class PromptError(ValueError):
    """A chat template that cannot be rendered; the message is one line."""


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def compiled(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render(template: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    try:
        return compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt)
    except jinja2.exceptions.TemplateError as e:
        raise PromptError(f"the chat template cannot render this conversation: {e}") from None


def user_turn(question: str, images: int = 1) -> list[dict]:
    """One user message: the images first, then the question (as the model cards ask)."""
    return [{"role": "user", "content": [*({"type": "image"} for _ in range(images)), {"type": "text", "text": question}]}]


def tile_layout(layout: dict, rows: int, cols: int) -> str:
    """SmolVLM's (and Idefics3's) layout of one image split into rows x cols tiles plus the whole
    image: each tile's tokens after `<fake_token_around_image><row_r_col_c>`, a newline after each
    row, then the whole image's after `<global-img>`; unsplit (0 x 0), the whole image alone."""
    around, image, tokens = layout["around"], layout["image"], layout["tokens"]
    whole = f"{around}{layout['global']}{image * tokens}{around}"
    if rows == 0 and cols == 0:
        return whole
    grid = "".join("".join(f"{around}<row_{r + 1}_col_{c + 1}>{image * tokens}" for c in range(cols)) + "\n"
                   for r in range(rows))
    return f"{grid}\n{whole}"


def image_layout(layout: dict, rows: int, cols: int) -> str:
    """One image's tokens in the prompt: tiled (SmolVLM), one image token per feature of a rows x cols
    grid (Qwen2-VL's), or a fixed count of image tokens (LLaVA's)."""
    if layout["layout"] == "tiles":
        return tile_layout(layout, rows, cols)
    return layout["image"] * (rows * cols if layout["layout"] == "grid" else layout["tokens"])


def chat_text(chat: dict, question: str, grids: list[tuple[int, int]]) -> str:
    """The prompt text for a question about images tiled as `grids` ((rows, cols) each; (0, 0) for an
    image that is not tiled; the grid of features for layout "grid")."""
    placeholder = chat["image"]["image"]
    parts = render(chat["template"], user_turn(question, len(grids))).split(placeholder)
    if len(parts) != len(grids) + 1:
        raise PromptError(f"the chat template wrote {len(parts) - 1} image placeholders for {len(grids)} images")
    return parts[0] + "".join(image_layout(chat["image"], *grid) + part for grid, part in zip(grids, parts[1:]))


class Prompter:
    """What a package is asked (nothing, a question, or a task and its text) as the decoder's
    prompt ids and the vision graph's text input, as its manifest's `prompting` says each is
    read; a one-line ValueError for what the package does not take, lacks or cannot fit."""

    def __init__(self, manifest: Manifest, tokenizer: Tokenizer):
        self.spec, self.tokenizer, self.max_positions = manifest.prompting, tokenizer, manifest.max_positions
        self.text_limit = manifest.data["dims"]["text"]["max"] if self.spec.vision_text else 0
        self.prefix = np.array(self.spec.prefix, dtype=np.int64)  # what every caption follows

    def ask(self, question: str | None = None, task: str | None = None,
            text: str | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """(prompt, the vision graph's inputs beyond pixels, per image) for what the model is
        asked: nothing (a caption), a `question`, or a `task` and its `text`, where the package
        reads each (Prompting.input). ValueError for what the model does not take, lacks or
        cannot fit. A chat model's prompt is laid out for each image's tiles (`chat`): here, for
        an untiled image (the shortest)."""
        where = self.spec.input
        if where == "task":
            if question is not None:
                raise ValueError("this model takes a task (--task), not a question")
            return self.prefix, [self.encoder_text(self.task(task, text))]
        if task is not None or text is not None:
            takes = {"chat": "a question (--question), not a task or text", "none": "no task or text"}
            raise ValueError("this model takes " + takes.get(where, "no task or text; ask with --question"))
        if question is None:
            if where == "encoder":
                raise ValueError("this model answers questions: give it one (--question)")
            if where != "chat":
                return self.prefix, []
        elif where == "none":
            raise ValueError("this model captions; it does not take questions")
        elif not question.strip():
            raise ValueError("the question is empty")
        if where == "chat":
            prompt = self.chat(question, [(0, 0)])
            if len(prompt) >= self.max_positions:
                raise ValueError(f"the question makes a {len(prompt)}-token prompt even for an untiled image; this "
                                 f"model reads {self.max_positions} tokens")
            return prompt, []
        if where == "encoder":
            return self.prefix, [self.encoder_text(question, "question")]
        ids = self.tokenizer.encode(question, add_special_tokens=False).ids
        limit = self.max_positions - len(self.prefix) - 1
        if not 1 <= len(ids) <= limit:
            raise ValueError(f"the question is {len(ids)} tokens; this model reads 1 to {limit}")
        return np.concatenate([self.prefix, np.array(ids, dtype=np.int64)]), []

    def chat(self, question: str | None, grids: list[tuple[int, int]]) -> np.ndarray:
        """A chat model's prompt ids: the question (the package's default when None) about images
        tiled as `grids` ((rows, cols) each), in its chat template (runtime.prompting)."""
        chat = self.spec.chat
        text = chat_text(chat, chat["question"] if question is None else question, grids)
        return np.array(self.tokenizer.encode(text).ids, dtype=np.int64)

    def task(self, task: str | None, text: str | None) -> str:
        """The prompt Florence2Processor builds for a task (the default one for None) and its text."""
        tasks = self.spec.tasks
        task = tasks["default"] if task is None else task
        if task not in tasks["prompts"]:
            raise ValueError(f"unknown task {task!r}; this model does {', '.join(tasks['prompts'])}")
        prompt = tasks["prompts"][task]["prompt"]
        if "{input}" not in prompt:
            if text is not None:
                raise ValueError(f"{task} takes no text")
            return prompt
        if text is None or not text.strip():
            raise ValueError(f"{task} needs a text (--text)")
        return prompt.format(input=text.strip())

    def encoder_text(self, text: str, what: str = "prompt") -> np.ndarray:
        """A text for the vision graph's second input, with the tokenizer's special tokens."""
        ids = self.tokenizer.encode(text).ids
        if len(ids) > self.text_limit:
            raise ValueError(f"the {what} is {len(ids)} tokens; this model reads 1 to {self.text_limit}")
        return np.array(ids, dtype=np.int64)
