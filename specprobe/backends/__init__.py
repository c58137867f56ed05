"""Backends: the ways specprobe runs a target model, each behind the engine's `Backend` protocol.

    torch/      a Hugging Face causal LM in PyTorch (any hub id, directory or de-quantised GGUF)

`backend_for(model)` returns the backend of a loaded model object. A backend imports the engine,
never a drafter.
"""

from __future__ import annotations

BACKENDS = ("torch",)


def backend_for(model):
    """The Backend that runs `model`: a Backend is itself; a torch module gets its TorchBackend."""
    from ..engine.protocol import Backend

    if isinstance(model, Backend):
        return model
    from .torch import TorchBackend

    return TorchBackend.of(model)
