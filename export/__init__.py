"""The heavy side of edgecap (torch, torchvision, transformers, onnx): the `export` extra.
This module itself stays light: entry points parse their arguments before importing torch."""

from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).parent / "weights" / "concept_decoder.pt"  # the bundled decoder's


def needs_extra(error: ModuleNotFoundError, command: str, extra: str) -> str:
    """The one line a runtime-only install gets instead of a ModuleNotFoundError traceback."""
    return f"{command} needs {error.name}, which this install leaves out: pip install '.[{extra}]'"
