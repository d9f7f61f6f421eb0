"""Chat prompts for the LLM-based families (a package with a `chat` section): the checkpoint's own
chat template, rendered with jinja2 the way transformers' apply_chat_template renders it (a
sandbox, trim_blocks, lstrip_blocks, loop controls, its tojson and raise_exception), then each
image placeholder of the text laid out as the family's processor lays it out, then tokenized
with the package's tokenizer (special tokens added as the processor adds them)."""

import json
from functools import lru_cache

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


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
