"""The lean side that ships to the device: numpy, onnxruntime, pillow, tokenizers.
Never imports torch or transformers."""

from .engine import DEFAULT_MODEL, Caption, Captioner
from .manifest import PackageError
from .preprocess import ImageError
from .providers import ProviderError
from .search import GenerationConfig

__all__ = ["Captioner", "Caption", "GenerationConfig", "DEFAULT_MODEL", "ImageError", "PackageError", "ProviderError"]
