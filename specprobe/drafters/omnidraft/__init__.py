"""OmniDraft (arXiv 2507.02659): one drafter for a target with another tokenizer: the drafter
(drafter.py), the vocabulary bridge between the two tokenizers (vocab_bridge.py) and the online
distillation of the drafter (distill.py)."""

from .drafter import AcceptancePredictor, OmniDraftConfig, OmniDraftDrafter, OmniDraftFrozenDrafter

__all__ = ["AcceptancePredictor", "OmniDraftConfig", "OmniDraftDrafter", "OmniDraftFrozenDrafter"]
