"""python -m benchmarks.gguf_peer SRC OUT --llama-cpp DIR --python PY

llama.cpp's GGUF files of a chat model folder, for benchmarks.latency's peer run (`--llama-mtmd
DIR/build/bin/llama-mtmd-cli --gguf OUT/mmproj-f32.gguf OUT/model-f32.gguf OUT/model-q8_0.gguf
OUT/model-q4_0.gguf`): the vision part (`--mmproj`, F32 as the runtime's tower) and the language
model at f32, q8_0 and q4_0 (Q4_K_M on SmolVLM-256M is mostly q5_0: its width 576 is no multiple of
256). DIR is a llama.cpp source tree built with `cmake -B build -DCMAKE_BUILD_TYPE=Release
-DGGML_NATIVE=ON && cmake --build build --target llama-mtmd-cli llama-quantize -j2` (the PyPI sdist of
llama-cpp-python vendors one); PY is a python with the converter's requirements (it pins
transformers 4.57: its own venv).

A folder written by transformers 5 (`python -m export random-hf`) needs three things a downloaded
checkpoint has: the language model's architecture in its config, a tokenizer config that transformers
4.57 reads (its special tokens under `additional_special_tokens`), and, for a tokenizer trained here,
the pre-tokenizer named, since the converter knows tokenizers by the hash of their output. The copy
under OUT/hf gets them; SRC is not touched.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

# model_type -> (the language model's architecture as the converter names it, its pre-tokenizer)
FAMILIES = {"smolvlm": ("VLlama3ForCausalLM", "smollm")}

CONVERT = """
import runpy, sys
tree, pre = sys.argv[1], sys.argv[2]
sys.path.insert(0, tree)
import conversion.base as base
for cls in vars(base).values():  # a tokenizer trained here has no known hash: name its pre-tokenizer
    if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
        cls.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[3:]]
runpy.run_path(tree + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def prepared(src: Path, out: Path) -> tuple[Path, str]:
    """A copy of `src` the converter reads, and its pre-tokenizer's name."""
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") not in FAMILIES:
        raise SystemExit(f"error: {src}: model_type {config.get('model_type')!r}; this script converts "
                         f"{', '.join(FAMILIES)} folders")
    arch, pre = FAMILIES[config["model_type"]]
    hf = out / "hf"
    shutil.rmtree(hf, ignore_errors=True)
    shutil.copytree(src, hf)
    config["text_config"].setdefault("architectures", [arch])
    (hf / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer = json.loads((hf / "tokenizer_config.json").read_text())
    if isinstance(tokenizer.get("extra_special_tokens"), list):  # transformers 5's spelling
        tokenizer["additional_special_tokens"] = tokenizer.pop("extra_special_tokens")
    tokenizer.pop("backend", None)
    tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
    (hf / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=1))
    return hf, pre


def run(cmd: list) -> None:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: {Path(str(cmd[0])).name} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gguf_peer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree with build/bin")
    parser.add_argument("--python", required=True, help="python with the converter's requirements")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    hf, pre = prepared(args.src, args.out)
    convert = [args.python, "-c", CONVERT, args.llama_cpp.resolve(), pre, hf, "--outtype", "f32"]
    run(convert + ["--outfile", args.out / "model-f32.gguf"])
    run(convert + ["--mmproj", "--outfile", args.out / "mmproj-f32.gguf"])
    for bits in ("q8_0", "q4_0"):
        run([args.llama_cpp / "build" / "bin" / "llama-quantize", args.out / "model-f32.gguf",
             args.out / f"model-{bits}.gguf", bits, "2"])
    names = ["mmproj-f32", "model-f32", "model-q8_0", "model-q4_0"]
    print(" ".join(str(args.out / f"{n}.gguf") for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
