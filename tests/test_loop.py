"""The decoding loop itself, on a deterministic fake target (fake_backend.py): no model is loaded.

Checked: the output equals plain decoding of the fake's rule whatever the drafts; accepted drafts
raise tau; the rows kept in the cache are exactly the pending ones and the accepted path; the EOS,
length, context and caller stops; empty proposals; the drafter's lifecycle and the explicit
signal for a step whose drafts were dropped.
"""

from __future__ import annotations

import pytest

from fake_backend import VOCAB, FakeBackend, reference, rule
from specprobe.drafters import make_drafter
from specprobe.engine import Backend, Drafter, DraftTree, Proposal, decode
from specprobe.engine.tree import AuxRows

PROMPT = [3, 5, 8]


class Oracle(Drafter):
    """Proposes the rule's next `depth` tokens (right), with a wrong sibling at each level."""

    def __init__(self, depth: int = 3, wrong: bool = False):
        self.depth, self.wrong = depth, wrong
        self.calls: list[str] = []
        self.dropped_steps = 0

    def start(self, session):
        self.calls.append("start")

    def propose(self, session):
        self.calls.append("propose")
        seq, tree, parent = list(session.ids), DraftTree(), -1
        for _ in range(self.depth):
            tok = rule(seq)
            if self.wrong:
                tok = (tok + 1) % VOCAB
            tree.add((tok + 5) % VOCAB, parent)  # a sibling that is never right
            parent = tree.add(tok, parent)
            seq.append(tok)
        aux = AuxRows(session.target.embed([0, 0]), [-1, parent], [1, 1], [(), ()])  # rows no real token sees
        return Proposal(tree, aux)

    def observe(self, session, step):
        self.calls.append("observe")
        self.dropped_steps += step.drafts_dropped

    def finish(self, session):
        self.calls.append("finish")


def test_the_fake_is_a_backend():
    assert isinstance(FakeBackend(), Backend)


@pytest.mark.parametrize("drafter", [Drafter(), Oracle(), Oracle(wrong=True), Oracle(depth=1)], ids=["ar", "oracle", "wrong", "shallow"])
def test_output_equals_plain_decoding_whatever_the_drafts(drafter):
    target = FakeBackend()
    ids, stats, stop = decode(target, PROMPT, drafter, 20, eos_ids=set())
    assert ids == reference(PROMPT, 20) and stop == "length"
    assert stats.new_tokens == 20 == sum(stats.accept_lengths)
    assert target.caches[0].tokens == PROMPT + ids[:-1]  # every committed token but the last (pending) one
    assert target.caches[0].released
    if isinstance(drafter, Oracle) and not drafter.wrong:
        assert stats.tau >= 0.8 * (1 + drafter.depth)  # the right drafts + the bonus token per forward
        assert max(stats.accept_lengths) == 1 + drafter.depth
    else:
        assert stats.tau == 1.0


def test_cache_keeps_pending_rows_and_the_accepted_path_only():
    target = FakeBackend()
    decode(target, PROMPT, Oracle(depth=2), 6, eos_ids=set())
    first, second = target.forwards[:2]
    assert first.n_pending == len(PROMPT) and second.n_pending == 1  # the prompt, then one bonus token a step
    assert first.kept_rows([1, 3]) == [0, 1, 2, 4, 6]


def test_eos_stops_and_is_kept():
    expected = reference(PROMPT, 30)
    eos = expected[6]
    ids, _, stop = decode(FakeBackend(), PROMPT, Oracle(), 30, eos_ids={eos})
    assert stop == "eos" and ids == expected[: expected.index(eos) + 1]


def test_context_stop_and_drafts_dropped_near_the_end():
    target = FakeBackend(max_length=20)
    drafter = Oracle(depth=3)
    ids, _, stop = decode(target, PROMPT, drafter, 100, eos_ids=set())
    assert stop == "context" and len(PROMPT) + len(ids) == 20
    assert ids == reference(PROMPT, 17)
    assert drafter.dropped_steps >= 1  # told explicitly, not left to guess from an empty proposal
    assert all(target.cache_length(c) <= 20 for c in target.caches)


def test_last_token_is_verified_without_drafts():
    drafter = Oracle(depth=3)
    decode(FakeBackend(), PROMPT, drafter, 5, eos_ids=set())
    assert drafter.dropped_steps == 1 or drafter.calls.count("propose") < drafter.calls.count("observe")


def test_lifecycle_is_owned_by_the_loop():
    drafter = Oracle()
    decode(FakeBackend(), PROMPT, drafter, 9, eos_ids=set())
    assert drafter.calls[0] == "start" and drafter.calls[-1] == "finish"
    assert drafter.calls.count("start") == drafter.calls.count("finish") == 1
    assert drafter.calls.count("observe") >= drafter.calls.count("propose")


def test_the_caller_stops_through_a_return_value():
    seen: list[int] = []
    drafter = Oracle(depth=2)
    target = FakeBackend()

    def on_tokens(new):
        seen.extend(new)
        return len(seen) >= 5

    ids, stats, stop = decode(target, PROMPT, drafter, 50, eos_ids=set(), on_tokens=on_tokens)
    assert stop == "stop" and ids == seen == reference(PROMPT, len(ids)) and len(ids) >= 5
    assert drafter.calls[-1] == "finish" and target.caches[0].released  # finish ran, the cache was freed


def test_empty_proposals_and_the_served_tokens():
    target = FakeBackend()
    ids, stats, _ = decode(target, PROMPT, Drafter(), 4, eos_ids=set())
    assert stats.draft_sizes == [0, 0, 0, 0] and stats.target_forwards == 4
    assert target.observed == PROMPT + ids  # what the backend may learn from: the prompt and the committed tokens


@pytest.mark.parametrize("method", ["pld", "esp", "hybrid", "lookahead"])
def test_real_drafters_on_the_fake_are_lossless(method):
    prompt = PROMPT + reference(PROMPT, 40)[:30]  # a text that repeats: the copying drafters find matches
    ids, stats, _ = decode(FakeBackend(), prompt, make_drafter(method), 24, eos_ids=set())
    assert ids == reference(prompt, 24)
    if method in ("pld", "hybrid"):
        assert stats.tau > 1.0  # drafts were accepted
