"""Images nobody would call photos, as users feed them anyway: icons, diagrams, charts, text,
screenshots, flat colours, noise, patterns, tiny and huge images. Seeded, written to disk like
user files (PNG, JPEG, and transparent PNGs for icons)."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("icon", "diagram", "chart", "text", "screenshot", "flat", "noise", "pattern", "gradient", "tiny", "huge")


def _colour(rng) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def icon(rng) -> Image.Image:
    size = int(rng.choice([32, 48, 64, 128, 256, 512]))
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 5)):
        box = sorted(rng.integers(0, size, 2)), sorted(rng.integers(0, size, 2))
        shape = (box[0][0], box[1][0], box[0][1] + 1, box[1][1] + 1)
        fill = (*_colour(rng), int(rng.choice([128, 255])))
        (draw.ellipse if rng.random() < 0.5 else draw.rounded_rectangle)(shape, fill=fill)
    return image


def diagram(rng) -> Image.Image:
    w, h = int(rng.integers(400, 1200)), int(rng.integers(300, 900))
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    centres = []
    for i in range(rng.integers(3, 14)):
        x, y = int(rng.integers(10, w - 130)), int(rng.integers(10, h - 50))
        draw.rectangle((x, y, x + 120, y + 40), outline="black", width=2, fill=_colour(rng) if rng.random() < 0.3
                       else (235, 240, 250))
        draw.text((x + 8, y + 12), f"module_{i}", fill="black")
        centres.append((x + 60, y + 20))
    for _ in range(len(centres) + int(rng.integers(0, 6))):
        a, b = rng.choice(len(centres), 2, replace=False)
        draw.line((*centres[a], *centres[b]), fill="gray", width=2)
    return image


def chart(rng) -> Image.Image:
    w, h = int(rng.integers(300, 900)), int(rng.integers(200, 700))
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    draw.line((40, h - 30, w - 10, h - 30), fill="black", width=2)
    draw.line((40, 10, 40, h - 30), fill="black", width=2)
    values = rng.random(int(rng.integers(3, 20)))
    step = (w - 60) / len(values)
    if rng.random() < 0.5:
        for i, v in enumerate(values):
            x = 45 + i * step
            draw.rectangle((x, h - 31 - v * (h - 50), x + step * 0.7, h - 31), fill=_colour(rng))
    else:
        points = [(45 + i * step, h - 30 - v * (h - 50)) for i, v in enumerate(values)]
        draw.line(points, fill=_colour(rng), width=3)
    return image


def text(rng) -> Image.Image:
    w, h = int(rng.integers(200, 1000)), int(rng.integers(100, 800))
    image = Image.new("RGB", (w, h), _colour(rng) if rng.random() < 0.3 else "white")
    draw = ImageDraw.Draw(image)
    words = ["the", "quick", "brown", "fox", "error", "invoice", "total", "2026", "page", "chapter", "lorem", "ipsum"]
    for y in range(5, h - 12, int(rng.integers(12, 30))):
        draw.text((5, y), " ".join(rng.choice(words, int(rng.integers(2, 12)))), fill="black")
    return image


def screenshot(rng) -> Image.Image:
    w, h = int(rng.choice([800, 1024, 1280])), int(rng.choice([600, 768, 720]))
    image = Image.new("RGB", (w, h), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, w, 30), fill=_colour(rng))
    for _ in range(rng.integers(2, 8)):
        x, y = int(rng.integers(0, w - 200)), int(rng.integers(40, h - 100))
        draw.rectangle((x, y, x + int(rng.integers(100, 400)), y + int(rng.integers(40, 200))), fill="white",
                       outline=(180, 180, 180))
        draw.text((x + 8, y + 8), "Settings  Save  Cancel", fill="black")
    return image


def noise(rng) -> Image.Image:
    h, w = int(rng.integers(64, 700)), int(rng.integers(64, 700))
    kind = rng.integers(3)
    if kind == 0:
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    elif kind == 1:
        array = np.clip(rng.normal(128, rng.uniform(5, 80), (h, w, 3)), 0, 255).astype(np.uint8)
    else:
        array = np.where(rng.random((h, w, 1)) < rng.uniform(0.01, 0.5), 255, 0).repeat(3, -1).astype(np.uint8)
    return Image.fromarray(array)


def pattern(rng) -> Image.Image:
    h, w, cell = int(rng.integers(100, 800)), int(rng.integers(100, 800)), int(rng.integers(2, 60))
    y, x = np.mgrid[0:h, 0:w] // cell
    mask = (x + y) % 2 if rng.random() < 0.5 else x % 2
    a, b = np.array(_colour(rng), np.uint8), np.array(_colour(rng), np.uint8)
    return Image.fromarray(np.where(mask[..., None] == 1, a, b))


def gradient(rng) -> Image.Image:
    h, w = int(rng.integers(50, 800)), int(rng.integers(50, 800))
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    a, b = np.array(_colour(rng), float), np.array(_colour(rng), float)
    return Image.fromarray(np.broadcast_to(a + (b - a) * t, (h, w, 3)).astype(np.uint8))


GENERATORS = {
    "icon": icon, "diagram": diagram, "chart": chart, "text": text, "screenshot": screenshot, "noise": noise,
    "pattern": pattern, "gradient": gradient,
    "flat": lambda rng: Image.new("RGB", (int(rng.integers(1, 800)), int(rng.integers(1, 800))), _colour(rng)),
    "tiny": lambda rng: noise(rng).resize((int(rng.integers(1, 17)), int(rng.integers(1, 17)))),
    "huge": lambda rng: pattern(rng).resize((int(rng.integers(3000, 6000)), int(rng.integers(2000, 4000)))),
}


def odd_images(n: int, folder: Path, seed: int = 0) -> list[Path]:
    """n images, the kinds in turn (huge ones a tenth as often: they are slow to write)."""
    rng, paths = np.random.default_rng(seed), []
    kinds = [k for k in KINDS if k != "huge"]
    for i in range(n):
        kind = "huge" if i % 50 == 49 else kinds[i % len(kinds)]
        image = GENERATORS[kind](rng)
        suffix = ".png" if image.mode == "RGBA" or rng.random() < 0.7 else ".jpg"
        paths.append(folder / f"{i:04d}-{kind}{suffix}")
        image.save(paths[-1])
    return paths
