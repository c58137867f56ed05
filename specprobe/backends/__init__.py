"""Backends: the ways specprobe runs a target model, each behind the engine's `Backend` protocol.

    torch/      a Hugging Face causal LM in PyTorch (any hub id, directory or de-quantised GGUF)
    llamacpp/   a GGUF file on llama.cpp (llama-cpp-python's C API), quantised as it is

`backend_for(model)` returns the backend of a loaded model object. A backend imports the engine,
never a drafter.
"""

from __future__ import annotations

BACKENDS = ("torch", "llamacpp")


def backend_for(model):
    """The Backend that runs `model`: a Backend is itself; a llama.cpp model has its own; a torch
    module gets its TorchBackend."""
    from ..engine.protocol import Backend
    from .llamacpp.model import LlamaCppModel

    if isinstance(model, LlamaCppModel):
        from .llamacpp.backend import LlamaCppBackend

        return LlamaCppBackend.of(model)
    if isinstance(model, Backend):
        return model
    from .torch import TorchBackend

    return TorchBackend.of(model)
