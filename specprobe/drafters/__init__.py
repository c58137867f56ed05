"""Speculative methods, one drafter per file, behind the engine's `Drafter` protocol
(engine/protocol.py); the pure n-gram helpers they share are in ngram.py. A drafter never imports
a backend: what it needs of the target it asks the session's `Backend` for."""

from __future__ import annotations

import dataclasses

from ..engine.protocol import Acceptance, Drafter, Proposal, StepResult
from ..errors import InvalidOptionError
from .draft_model import DraftModelConfig, DraftModelDrafter
from .eagle import ConfuDrafter, EagleConfig, EagleDrafter
from .esp import ESPConfig, ESPDrafter
from .hybrid import HybridConfig, HybridDrafter
from .lookahead import LookaheadConfig, LookaheadDrafter
from .omnidraft import OmniDraftConfig, OmniDraftDrafter, OmniDraftFrozenDrafter
from .prompt_lookup import PLDConfig, PLDDrafter
from .suffix import OUTPUTS_KEY, SuffixConfig, SuffixDrafter
from .token_recycling import MATRIX_KEY, TokenRecyclingConfig, TokenRecyclingDrafter

# method name -> (drafter class, its config dataclass or None)
METHODS: dict[str, tuple[type[Drafter], type | None]] = {
    "ar": (Drafter, None),
    "esp": (ESPDrafter, ESPConfig),
    "pld": (PLDDrafter, PLDConfig),
    "lookahead": (LookaheadDrafter, LookaheadConfig),
    "draft": (DraftModelDrafter, DraftModelConfig),
    "hybrid": (HybridDrafter, HybridConfig),
    "token-recycling": (TokenRecyclingDrafter, TokenRecyclingConfig),
    "suffix": (SuffixDrafter, SuffixConfig),
    "eagle": (EagleDrafter, EagleConfig),
    "confu": (ConfuDrafter, EagleConfig),
    "omnidraft": (OmniDraftDrafter, OmniDraftConfig),
    "omnidraft-frozen": (OmniDraftFrozenDrafter, OmniDraftConfig),
}


DEFAULT_METHOD = "hybrid"  # the lossless method the bench measures fastest overall on the default model

# methods whose drafter runs a second model, passed as the `draft_model` option (--draft-model)
DRAFT_MODEL_METHODS = ("draft", "omnidraft", "omnidraft-frozen")


def make_drafter(method: str, **options) -> Drafter:
    """Build the drafter of `method` from keyword options (unknown ones are an error)."""
    if method not in METHODS:
        raise InvalidOptionError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cls, config_cls = METHODS[method]
    options = {k: v for k, v in options.items() if v is not None}
    if config_cls is None:
        if options:
            raise InvalidOptionError(f"method {method!r} takes no options, got {', '.join(options)}")
        return cls()
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(options) - known
    if unknown:
        raise InvalidOptionError(
            f"unknown option(s) for {method!r}: {', '.join(sorted(unknown))}; it takes {', '.join(sorted(known))}"
        )
    return cls(config_cls(**options))


def forget_outputs(state: dict) -> None:
    """Drop from a target's `drafter_state()` what drafters learned from earlier requests' outputs
    (suffix tries, Token Recycling matrices), as a fresh process would start; what they learned of
    the machine and model (step costs, chain calibration) stays."""
    for key in [k for k in state if isinstance(k, tuple) and k and k[0] in (OUTPUTS_KEY, MATRIX_KEY)]:
        del state[key]


__all__ = ["Acceptance", "Drafter", "Proposal", "StepResult", "METHODS", "DEFAULT_METHOD", "DRAFT_MODEL_METHODS", "forget_outputs", "make_drafter"]
