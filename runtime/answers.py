"""A task's answer as a structured result, in the lean runtime (no torch, no transformers), chosen by
the parse kind the manifest gives each task (PARSERS), not by model family. The kinds today are
Florence-2's: what `Florence2Processor.post_process_generation(text, task, image_size)[task]`
returns, rule for rule. Boxes, quad boxes and polygons are written as <loc_N> tokens, N in 0..999
bins of the image's width and height; they come back in pixels of the original image.

    parse(text, "<OD>", (640, 480), manifest.prompting.tasks) -> {"bboxes": [[x0, y0, x1, y1], ...], "labels": [...]}
    draw(image, result) -> the image with the result's boxes, quad boxes and polygons
"""

import re

import numpy as np
from PIL import Image, ImageDraw

BINS = 1000
TEXT = r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_)"
BOX = r"<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>"
OCR = r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>"
SEP, POLY, END = "<sep>", "<poly>", "</poly>"


def dequantize(bins: list[int], size: tuple[int, int]) -> list[int]:
    """Bins (x, y pairs) -> pixel coordinates at the bins' centres, truncated to int, in float32
    as the processor computes them (so a coordinate on a rounding edge lands where it does there)."""
    width, height = size
    xy = np.asarray(bins, dtype=np.float32).reshape(-1, 2) + np.float32(0.5)
    xy *= np.array([width / BINS, height / BINS], dtype=np.float32)
    return xy.astype(np.int32).reshape(-1).tolist()


def clean(text: str) -> str:
    return text.replace("<s>", "").replace("</s>", "").replace("<pad>", "")


def ascii_only(phrase: str) -> str:
    return phrase.encode("ascii", "ignore").decode("ascii")


def boxes(text: str, size: tuple[int, int], allow_empty_phrase: bool = False) -> list[dict]:
    """Phrases each followed by one or more boxes: one instance per box."""
    pattern = r"(?:(?:<loc_\d+>){4,})" if allow_empty_phrase else r"([^<]+(?:<loc_\d+>){4,})"
    instances = []
    for phrase_text in re.findall(pattern, clean(text)):
        phrase_text = phrase_text.replace("<ground>", "", 1).replace("<obj>", "", 1)
        if not phrase_text and not allow_empty_phrase:
            continue
        match = re.search(TEXT, phrase_text)
        found = [[int(m.group(j)) for j in range(1, 5)] for m in re.finditer(BOX, phrase_text)]
        if match and found:
            phrase = ascii_only(match.group().strip())
            instances += [{"bbox": dequantize(box, size), "cat_name": phrase} for box in found]
    return instances


def grounding(text: str, size: tuple[int, int], banned: set[str]) -> list[dict]:
    """Phrases each followed by their boxes: one instance per phrase."""
    instances = []
    for phrase_text in re.findall(r"([^<]+(?:<loc_\d+>){4,})", clean(text)):
        phrase_text = phrase_text.replace("<ground>", "", 1).replace("<obj>", "", 1)
        match = re.search(TEXT, phrase_text) if phrase_text else None
        if not match or match.group().strip() in banned:
            continue
        found = [[int(m.group(j)) for j in range(1, 5)] for m in re.finditer(BOX, phrase_text)]
        if found:
            instances.append({"bbox": [dequantize(box, size) for box in found],
                              "cat_name": ascii_only(match.group().strip())})
    return instances


def ocr(text: str, size: tuple[int, int], pattern: str | None, area_threshold: float) -> list[dict]:
    instances = []
    for content, *quad in re.findall(pattern or OCR, clean(text)):
        box = dequantize([int(i) for i in quad], size)
        if area_threshold > 0:
            x, y = box[0::2], box[1::2]
            area = 0.5 * abs(sum(x[i] * y[i + 1] - x[i + 1] * y[i] for i in range(3)))
            if area < size[0] * size[1] * area_threshold:
                continue
        instances.append({"quad_box": box, "text": content.strip()})
    return instances


def polygons(text: str, size: tuple[int, int], allow_empty_phrase: bool = False) -> list[dict]:
    """Phrases each followed by polygons (<poly>..</poly> groups of <loc_N> pairs, <sep> between)."""
    tokens = rf"(?:<loc_\d+>|{re.escape(SEP)}|{re.escape(POLY)}|{re.escape(END)}){{4,}}"
    pattern = rf"(?:{tokens})" if allow_empty_phrase else rf"([^<]+{tokens})"
    instances = []
    for phrase_text in re.findall(pattern, clean(text)):
        stripped = re.sub(r"^<loc_\d+>", "", phrase_text, count=1)
        if not stripped and not allow_empty_phrase:
            continue
        match = re.search(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_|<poly>)", stripped)
        if not match:
            continue
        if POLY in phrase_text and END in phrase_text:
            groups = [m.group(1) for m in re.finditer(rf"{re.escape(POLY)}(.*?){re.escape(END)}", phrase_text)]
        else:
            groups = [phrase_text]
        for group in groups:
            found = [m.group(1) for m in re.finditer(rf"((?:<loc_\d+>)+)(?:{re.escape(SEP)}|$)", group)]
            if not found:
                continue
            shapes = []
            for part in found:
                bins = [int(b) for b in re.findall(r"<loc_(\d+)>", part)]
                shapes.append(dequantize(bins[: len(bins) // 2 * 2], size))
            instances.append({"cat_name": match.group().strip(), "polygons": shapes})
    return instances


def pure_text(text: str, size: tuple[int, int], config: dict) -> str:
    return text.replace("<s>", "").replace("</s>", "").strip()  # <pad> stays, as the processor leaves it


def described_boxes(text: str, size: tuple[int, int], config: dict, allow_empty_phrase: bool = False) -> dict:
    found = boxes(text, size, allow_empty_phrase)
    return {"bboxes": [i["bbox"] for i in found], "labels": [i["cat_name"] for i in found]}


def ocr_regions(text: str, size: tuple[int, int], config: dict) -> dict:
    settings = config.get("ocr", {})
    found = ocr(text, size, settings.get("PATTERN"), settings.get("AREA_THRESHOLD", 0.0))
    return {"quad_boxes": [i["quad_box"] for i in found], "labels": [i["text"] for i in found]}


def grounded_phrases(text: str, size: tuple[int, int], config: dict) -> dict:
    found = grounding(text, size, set(config.get("phrase_grounding", {}).get("banned_grounding_tokens", [])))
    return {"bboxes": [b for i in found for b in i["bbox"]], "labels": [i["cat_name"] for i in found for _ in i["bbox"]]}


def described_polygons(text: str, size: tuple[int, int], config: dict, allow_empty_phrase: bool = False) -> dict:
    found = polygons(text, size, allow_empty_phrase)
    return {"polygons": [i["polygons"] for i in found], "labels": [i["cat_name"] for i in found]}


def boxes_or_polygons(text: str, size: tuple[int, int], config: dict) -> dict:
    if POLY in text:
        found = polygons(text, size)
        return {"bboxes": [], "bboxes_labels": [], "polygons": [i["polygons"] for i in found],
                "polygons_labels": [i["cat_name"] for i in found]}
    found = boxes(text, size)
    return {"bboxes": [i["bbox"] for i in found], "bboxes_labels": [i["cat_name"] for i in found],
            "polygons": [], "polygons_labels": []}


# parse kind -> (text, original (width, height), the manifest's tasks["parse"] settings) -> result
PARSERS = {
    "pure_text": pure_text,
    "description_with_bboxes": described_boxes,
    "bboxes": lambda text, size, config: described_boxes(text, size, config, allow_empty_phrase=True),
    "ocr": ocr_regions,
    "phrase_grounding": grounded_phrases,
    "description_with_polygons": described_polygons,
    "polygons": lambda text, size, config: described_polygons(text, size, config, allow_empty_phrase=True),
    "description_with_bboxes_or_polygons": boxes_or_polygons,
}


def parse(text: str, task: str, size: tuple[int, int], tasks: dict):
    """The answer to `task` from the model's text (special tokens kept) and the original image's
    (width, height); `tasks` is the manifest's (its kinds were checked against PARSERS when the
    package was opened)."""
    return PARSERS[tasks["prompts"][task]["parse"]](text, size, tasks["parse"])


COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


def draw(image: Image.Image, result) -> Image.Image:
    """A copy of the (original, upright RGB) image with the result's shapes outlined, one colour
    per instance, each labelled at its first corner. A text result leaves the image as it is."""
    out = image.copy()
    if not isinstance(result, dict):
        return out
    pen, width = ImageDraw.Draw(out), max(2, round(max(image.size) / 300))
    shapes = [([x0, y0, x1, y0, x1, y1, x0, y1], label) for (x0, y0, x1, y1), label in
              zip(result.get("bboxes", []), result.get("labels") or result.get("bboxes_labels", []))]
    shapes += list(zip(result.get("quad_boxes", []), result.get("labels", [])))
    shapes += [(flat, label) for group, label in zip(result.get("polygons", []),
                                                     result.get("labels") or result.get("polygons_labels", []))
               for flat in group if len(flat) >= 4]
    for i, (flat, label) in enumerate(shapes):
        points, color = list(zip(flat[0::2], flat[1::2])), COLORS[i % len(COLORS)]
        pen.line([*points, points[0]], fill=color, width=width)
        if label:
            x, y = points[0]
            left, top, right, bottom = pen.textbbox((x, y), label)
            pen.rectangle((left, top, right + 2, bottom + 2), fill=color)
            pen.text((x + 1, y + 1), label, fill="white")
    return out
