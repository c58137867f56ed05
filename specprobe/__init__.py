"""specprobe: lossless speculative decoding for Hugging Face causal LMs.

    import specprobe
    lm = specprobe.load("smollm2-135m")
    out = specprobe.generate(lm.model, lm.tokenizer, "Why is the sky blue?", method="esp")
    print(out.text, out.stats.tau)
"""

from .api import generate, prepare
from .backend_choice import BackendChoice, choose_backend
from .drafters import DEFAULT_METHOD, METHODS
from .engine.decode import GenerationResult, GenerationStats
from .errors import InvalidOptionError, ModelNotFoundError, PromptTooLongError, SpecProbeError
from .models import BUILTIN_MODELS, DEFAULT_MODEL, format_prompt, load

__version__ = "0.1.0"
__all__ = [
    "generate",
    "prepare",
    "choose_backend",
    "BackendChoice",
    "load",
    "format_prompt",
    "GenerationResult",
    "GenerationStats",
    "METHODS",
    "DEFAULT_METHOD",
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "SpecProbeError",
    "ModelNotFoundError",
    "PromptTooLongError",
    "InvalidOptionError",
]
