"""The optimum-onnx peer for benchmarks.latency, run by the python of a venv holding
optimum-onnx (it pins transformers < 4.58, so it cannot share the project's venv):

    PEER_PYTHON benchmarks/peer_optimum.py HF_DIR CACHE THREADS

Exports HF_DIR with optimum's `image-to-text-with-past` task into CACHE (once), loads
`ORTModelForVision2Seq` on the CPU provider with THREADS intra-op threads, prints one
ready line, then answers one JSON line per request: {"images", "max_new_tokens",
"num_beams"} -> {"tokens", "marks"}: each call does what a user's does, image processor + generate;
"marks" is time.perf_counter() after each of its decoder steps (the system's monotonic clock, which
the benchmark's process reads too).
"""

import contextlib
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path


def main() -> None:
    src, cache, threads = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    reply = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # the exporter's chatter must not reach the pipe
        import onnxruntime as ort
        import torch
        from optimum.exporters.onnx import main_export
        from optimum.onnxruntime import ORTModelForVision2Seq
        from PIL import Image
        from transformers import AutoImageProcessor

        torch.set_num_threads(threads)
        if not (cache / "config.json").exists():
            main_export(str(src), output=str(cache), task="image-to-text-with-past")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        model = ORTModelForVision2Seq.from_pretrained(cache, provider="CPUExecutionProvider", session_options=opts)
        processor = AutoImageProcessor.from_pretrained(src)
    marks = []
    step = model.forward  # generate runs it once per decoder step

    def marked_step(*args, **kwargs):
        out = step(*args, **kwargs)
        marks.append(time.perf_counter())
        return out

    model.forward = marked_step
    print(json.dumps({"optimum": f"optimum-onnx {version('optimum-onnx')}"}), file=reply, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        images = [Image.open(p).convert("RGB") for p in request["images"]]
        pixels = processor(images=images, return_tensors="pt").pixel_values
        marks.clear()
        with contextlib.redirect_stdout(sys.stderr):
            out = model.generate(pixel_values=pixels, max_new_tokens=request["max_new_tokens"],
                                 num_beams=request["num_beams"], do_sample=False)
        print(json.dumps({"tokens": out[:, 1:].tolist(), "marks": marks}), file=reply, flush=True)


if __name__ == "__main__":
    main()
