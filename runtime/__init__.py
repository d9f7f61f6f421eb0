"""The lean side that ships to the device: numpy, onnxruntime, pillow, tokenizers.
Never imports torch or transformers."""

from .engine import DEFAULT_MODEL, Caption, Captioner, GenerationConfig
from .manifest import PackageError
from .preprocess import ImageError
from .providers import ProviderError

__all__ = ["Captioner", "Caption", "GenerationConfig", "DEFAULT_MODEL", "ImageError", "PackageError", "ProviderError"]
