"""Helpers the tests share: the repository root, running a module as a runtime-only install
would, and the images the fixtures write to disk (scikit-image's photos, generated ones, icons
with transparency)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent


def without_torch(module: str, *args, absent=(), stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` as on a runtime-only install: torch, torchvision and transformers
    (and the `absent` modules) cannot be imported (as if not installed); fails if any of them
    ends up imported anyway. `stdin`: bytes piped to the program."""
    code = f"""
import runpy, sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        top = name.split('.')[0]
        if top in ('torch', 'torchvision', 'transformers', *{tuple(absent)!r}):
            raise ModuleNotFoundError(f"No module named '{{top}}'", name=top)
sys.meta_path.insert(0, Absent())
sys.argv = [{module!r}, *{[str(a) for a in args]!r}]
try:
    runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
finally:
    assert not {{'torch', 'transformers', 'torchvision'}} & set(sys.modules), sorted(sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, cwd=ROOT, timeout=300)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def caption_without_torch(*args, **kw) -> subprocess.CompletedProcess:
    return without_torch("runtime.caption", *args, **kw)


def photos():
    from skimage import data

    return {
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "astronaut": data.astronaut(),
        "rocket": data.rocket(),
        "motorcycle": data.stereo_motorcycle()[0],
        "camera": data.camera(),  # grayscale
    }


def generated(rng: np.random.Generator):
    """Images unlike anything in training: noise, gradients, shapes, odd sizes."""
    images = {"noise": rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)}
    y, x = np.mgrid[0:300, 0:200]
    images["gradient"] = np.stack([x * 255 // 199, y * 255 // 299, (x + y) % 256], -1).astype(np.uint8)
    shapes = Image.new("RGB", (500, 260), (30, 120, 200))
    draw = ImageDraw.Draw(shapes)
    draw.ellipse((40, 40, 220, 220), fill=(250, 200, 0))
    draw.rectangle((280, 60, 460, 200), fill=(200, 30, 30))
    images["shapes"] = np.asarray(shapes)
    images["stripes"] = np.kron((np.indices((8, 8)).sum(0) % 2 * 255).astype(np.uint8), np.ones((29, 37), np.uint8))
    return images


def transparent() -> dict[str, Image.Image]:
    """Icons as they come: RGBA with graded alpha, gray + alpha, a palette with a transparent index."""
    rgba = Image.new("RGBA", (160, 120), (0, 0, 0, 0))
    draw = ImageDraw.Draw(rgba)
    draw.ellipse((20, 10, 140, 110), fill=(200, 40, 40, 255))
    draw.rectangle((60, 40, 150, 100), fill=(30, 90, 220, 128))
    la = Image.fromarray(np.stack([np.tile(np.arange(160, dtype=np.uint8), (120, 1)),
                                   np.tile(np.linspace(0, 255, 120, dtype=np.uint8)[:, None], (1, 160))], -1), "LA")
    palette = rgba.convert("RGB").quantize(8)
    palette.info["transparency"] = palette.getpixel((0, 0))
    return {"rgba": rgba, "la": la, "palette": palette}


def saved(folder: Path, arrays: dict[str, np.ndarray]) -> list[Path]:
    """Each array saved as FOLDER/NAME.png, in order: photos as files, as a user passes them."""
    for name, array in arrays.items():
        Image.fromarray(array).save(folder / f"{name}.png")
    return [folder / f"{name}.png" for name in arrays]


def same_size_photos(folder: Path) -> list[Path]:
    """Three photos resized to 300x200: one tiling or grid, so a chat model answers them in one batch."""
    pictures = photos()
    return saved(folder, {n: np.asarray(Image.fromarray(pictures[n]).resize((300, 200)))
                          for n in ("chelsea", "coffee", "motorcycle")})


def write_video(path: Path, segments: list[np.ndarray], codec: str, fps: int = 10) -> Path:
    """A video showing each HxWx3 frame for one second. ffv1 in Matroska is lossless (frames
    decode to exactly these pixels); libx264 is what cameras and phones write."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = segments[0].shape[:2]
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        for frame in segments:
            for _ in range(fps):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


TEXTS = ["a photo of a cat", "espresso", "a picture of a dog running on a beach near the sea at sunset",
         "two people"]  # texts of different lengths, scored in one batch


def hf_pair(src, pkg):
    """(Captioner on the package, transformers' reference on the folder it was exported from)."""
    from export.hf import HFReference
    from runtime import Captioner

    captioner = Captioner(pkg, provider="cpu")
    return captioner, HFReference(src, captioner.manifest)


def reference_scores(ref, image, captioner, texts: list[str], question: str | None = None) -> list[float]:
    """log p(text | image[, question]) from a reference's own teacher-forced logits (eager
    PyTorch or transformers), one text at a time: no padding, no batching, no shared encoder
    pass; the question tokenized by transformers' tokenizer."""
    import torch

    asked = {} if question is None else {"question": question}
    prompt, eos = [int(i) for i in ref.ask(question)[0]] if asked else captioner.prompting.prefix.tolist(), \
        captioner.manifest.tokenizer.eos_ids[0]
    scores = []
    for text in texts:
        seq = np.array([[*prompt, *captioner.tokenizer.encode(text, add_special_tokens=False).ids, eos]])
        logp = torch.log_softmax(torch.from_numpy(ref.logits(ref.pixels([image]), seq[:, :-1], **asked)).double(), -1)[0]
        scores.append(float(sum(logp[t - 1, seq[0, t]] for t in range(len(prompt), seq.shape[1]))))
    return scores
