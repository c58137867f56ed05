"""The llama.cpp backend: GGUF models on llama.cpp through llama-cpp-python's C API (model.py: the
loaded file and its context; backend.py: the engine's Backend; sequences.py: a tree as sequence
sets; library.py: the bindings)."""

from .library import available, batch_invariant_build
from .model import LlamaCppModel, LlamaCppSettings

__all__ = ["LlamaCppModel", "LlamaCppSettings", "available", "batch_invariant_build"]
