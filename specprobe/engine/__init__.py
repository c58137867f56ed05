"""The engine: one decoding loop (decode.py) over two protocols (protocol.py), a `Backend` that
runs the target and a `Drafter` that proposes; the candidate tree and its layout (tree.py), the
acceptance rules (sampling.py) and the hardware-aware tree budget (budget.py).

It imports nothing of specprobe but `errors`: no backend, no drafter, no command.
"""

from .decode import GenerationResult, GenerationStats, Session, decode
from .protocol import Acceptance, Backend, Drafter, Proposal, StepResult, VerifyOutput
from .sampling import SamplingConfig
from .tree import ROOT, AuxRows, DraftTree, Layout

__all__ = [
    "Acceptance",
    "AuxRows",
    "Backend",
    "DraftTree",
    "Drafter",
    "GenerationResult",
    "GenerationStats",
    "Layout",
    "Proposal",
    "ROOT",
    "SamplingConfig",
    "Session",
    "StepResult",
    "VerifyOutput",
    "decode",
]
