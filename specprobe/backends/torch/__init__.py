"""The torch backend: Hugging Face causal LMs in PyTorch (backend.py), with the speed layer under it:
per-row-count kernel plans (kernels.py), grouped attention (attention.py), the reduced draft
head's vocabulary (draft_vocab.py), the KV cache (kv_cache.py), tree masks (masks.py), the cost
curve and profile (profile.py), layer-skip draft models (truncate.py)."""

from .backend import KERNEL_MODES, TorchBackend

__all__ = ["KERNEL_MODES", "TorchBackend"]
