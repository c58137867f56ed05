"""Where an answer first differs from `ar`'s, and whether `ar`'s logits there were a near-tie.

Lossless means token-identical to the same model's plain decoding (`ar`) in the same dtype on the
same backend. In float32 a difference is a bug; in bfloat16 or float16 two candidates' logits can
round to (almost) the same value, and a verification forward over many rows, whose sums run in
another order than ar's one-row forward, may then pick the other one without any bug. So for each
answer that differs from its `ar`, the bench records the first differing (turn, position) and
ar's top-2 logit gap there, recomputed by one forward of ar's model (same dtype, same backend)
over the conversation up to that position: a gap under NEAR_TIE is a near-tie, anything else
points at a bug. report.py counts both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..api import target_of
from ..engine.tree import DraftTree
from ..models import format_prompt

NEAR_TIE = 1e-2  # a top-2 logit gap under this is a tie the dtype's rounding can flip


@dataclass
class FirstDifference:
    turn: int  # index of the first turn whose tokens differ
    position: int  # index, among that turn's new tokens, of the first differing token
    top2_gap: float | None  # ar's logit gap between its two best tokens there; None where ar had stopped
    near_tie: bool | None  # top2_gap < NEAR_TIE

    def to_dict(self) -> dict:
        return asdict(self)


def first_difference(a: list[list[int]], b: list[list[int]]) -> tuple[int, int] | None:
    """(turn, position) of the first token where two answers' per-turn token ids differ (one
    answer ending earlier counts as a difference at its end); None where they are equal.

    >>> first_difference([[1, 2, 3]], [[1, 2, 4]])
    (0, 2)
    >>> first_difference([[1, 2], [5]], [[1, 2], [5, 6]])
    (1, 1)
    >>> first_difference([[1, 2]], [[1, 2]]) is None
    True
    """
    for turn, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return turn, next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
    return None


def top2_gap(target, context_ids: list[int]) -> float:
    """The gap between the two largest logits after `context_ids`, as `target` computes them (one
    forward from an empty cache; the logits in the model's own precision)."""
    cache = target.new_cache()
    try:
        out = target.forward(cache, list(context_ids), DraftTree())
    finally:
        target.release(cache)
    best = out.logits[0].float().topk(2).values  # row 0: the last context token's logits
    return float(best[0] - best[1])


def explain(lm, question: dict, reference: list, turns: list) -> FirstDifference | None:
    """The first difference between an answer's `turns` and the reference's (`ar`'s TurnOutputs
    for the same question), with ar's top-2 gap there measured on `lm` (ar's LoadedModel); None
    where the answers are token-identical."""
    where = first_difference([t.token_ids for t in reference], [t.token_ids for t in turns])
    if where is None:
        return None
    turn, position = where
    ids = reference[turn].token_ids
    if position >= len(ids):  # the method went on where ar had stopped: no ar logits to read
        return FirstDifference(turn, position, None, None)
    messages = []
    for t in range(turn + 1):
        messages.append({"role": "user", "content": question["turns"][t]})
        if t < turn:
            messages.append({"role": "assistant", "content": reference[t].text})
    gap = top2_gap(target_of(lm.model), format_prompt(lm.tokenizer, messages) + ids[:position])
    return FirstDifference(turn, position, gap, gap < NEAR_TIE)
