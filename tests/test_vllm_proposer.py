"""specprobe's vLLM proposer (integrations/vllm.py) against vLLM's `custom_class` interface, without
vLLM: rows of a persistent batch as vLLM passes them (the tokens each step emitted, the row's
whole text in a [max_num_reqs, max_model_len] array), requests found again when rows move,
finished ones freed into the global suffix trie, acceptance learned from what the target emitted,
and the budget drafting less as the batch fills the machine. tests/test_vllm.py runs it inside vLLM.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from specprobe.integrations.vllm import PARKED_CALLS, HybridProposer, PromptLookupProposer, StepCosts, SuffixProposer, size_chains, speculative_config

MAX_LEN = 512


def config(k: int = 8):
    return SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=k), model_config=SimpleNamespace(max_model_len=MAX_LEN))


STEP_FIXED, STEP_PER_TOKEN = 0.05, 0.004  # the engine step the fake clock charges: 50 ms + 4 ms a token


class PersistentBatch:
    """Texts by row, passed to `propose` as vLLM's model runner passes them, with a clock that
    charges each step by the tokens it verified."""

    def __init__(self, rows: int = 32):
        self.token_ids = np.zeros((rows, MAX_LEN), dtype=np.int32)
        self.texts: list[list[int]] = []
        self.now, self.drafts = 0.0, []

    def step(self, proposer, emitted: list[list[int]]) -> list[list[int]]:
        """Append `emitted[i]` to row i's text (a new row when i is past the end: `emitted[i]` is
        its prompt and first token), then propose."""
        sampled = []
        for i, new in enumerate(emitted):
            if i == len(self.texts):
                self.texts.append([])
                new_row = True
            else:
                new_row = False
            self.texts[i] += new
            self.token_ids[i, : len(self.texts[i])] = self.texts[i]
            sampled.append(new[-1:] if new_row else new)
        counts = np.array([len(t) for t in self.texts], dtype=np.int32)
        self.now += STEP_FIXED + STEP_PER_TOKEN * sum(1 + len(d) for d in self.drafts)
        proposer.clock = lambda: self.now
        self.drafts = proposer.propose(sampled, counts, self.token_ids)
        return self.drafts

    def remove(self, i: int) -> None:
        """Request i finished: the last row moves into its place (vLLM's condense)."""
        self.texts[i] = self.texts[-1]
        self.texts.pop()
        for j, t in enumerate(self.texts):
            self.token_ids[j, : len(t)] = t


REPEAT = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]


def test_proposes_what_followed_the_last_tokens_before():
    p, batch = PromptLookupProposer(config()), PersistentBatch()
    drafts = batch.step(p, [REPEAT + [30, 31] + REPEAT[:3]])  # the prompt and the first token: "11 12 13" occurred before
    assert drafts[0], "a repeated passage must be drafted"
    assert drafts[0] == REPEAT[3 : 3 + len(drafts[0])]


def test_rows_that_move_keep_their_own_request():
    p, batch = HybridProposer(config()), PersistentBatch()
    a, b, c = [1, 2, 3, 4, 5, 6, 1, 2], [7, 8, 9, 10, 7, 8], [40, 41, 42, 43, 40, 41]
    batch.step(p, [a, b, c])
    batch.remove(0)  # request a finished: c moves to row 0
    drafts = batch.step(p, [[42], [9]])
    assert p.by_row[0].tokens == c + [42] and p.by_row[1].tokens == b + [9]
    assert drafts[0][:1] == [43] and drafts[1][:1] == [10]
    assert list(p.parked.values())[0].tokens == a, "a request gone from the batch is parked (it may only be paused)"
    for _ in range(PARKED_CALLS):
        batch.step(p, [[40], [7]])
    assert not p.parked and list(p.outputs.outputs[0]) == a[-1:], "a request gone long enough has finished: its output joins the global trie"


def test_the_next_turn_of_a_chat_is_a_new_request():
    """A prompt that starts with an earlier request's whole text, in the same row, is not that request."""
    p, batch = HybridProposer(config()), PersistentBatch()
    batch.step(p, [[1, 2, 3, 4, 5]])
    first = p.by_row[0]
    batch.texts[0] += [60, 61, 62]  # the finished answer, the user's next turn and the template
    batch.step(p, [[63]])
    assert p.by_row[0] is not first and p.by_row[0].prompt_length == 8


def test_a_finished_output_is_drafted_for_a_later_request():
    p, batch = SuffixProposer(config()), PersistentBatch()
    answer = [50, 51, 52, 53, 54, 55, 56, 57]
    batch.step(p, [[1, 2, 3, 50]])
    for t in answer[1:]:
        batch.step(p, [[t]])
    batch.remove(0)
    batch.step(p, [[70, 71, 72, 73]])  # another request, for long enough that the first counts as finished
    for t in range(PARKED_CALLS):
        batch.step(p, [[80 + t]])
    batch.remove(0)
    drafts = batch.step(p, [[9, 8, 7, 50, 51]])  # a third, whose answer starts like the first one's
    assert drafts[0] == [52, 53], "a two-token match speculates two tokens (SuffixDecoding's adaptive length)"


def test_acceptance_is_learned_from_what_the_target_emitted():
    """A target whose text is random over 20 tokens: prompt lookup always finds a match, the target
    follows it one time in 20 (about break-even on this clock), and the drafts dwindle; a target
    that follows every draft keeps them coming, four times as many or more. Each step emits the accepted drafts and one token of the target's own, as
    vLLM does."""
    import random

    def run(follow: bool) -> list[int]:
        rng = random.Random(0)
        p, batch = PromptLookupProposer(config()), PersistentBatch()
        drafts = batch.step(p, [[rng.randrange(20) for _ in range(40)]])
        lengths = []
        for _ in range(60):
            if follow:
                new = drafts[0] + [rng.randrange(20)]
            else:
                truth = [rng.randrange(20) for _ in range(9)]
                accepted = next((j for j, t in enumerate(drafts[0]) if t != truth[j]), len(drafts[0]))
                new = truth[: accepted + 1]
            drafts = batch.step(p, [new])
            lengths.append(len(drafts[0]))
        return lengths

    missed, followed = run(False), run(True)
    assert max(missed[:5]) > 0, "lookup drafts before it has evidence"
    assert 4 * sum(missed[-30:]) < sum(followed[-30:]), (missed, followed)


def test_the_step_line_is_fitted_to_the_engine_steps():
    p, batch = PromptLookupProposer(config()), PersistentBatch()
    drafts = batch.step(p, [[1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]])
    for _ in range(40):  # the target follows every draft, then emits one token of its own
        drafts = batch.step(p, [drafts[0] + [drafts[0][-1] if drafts[0] else 1]])
    a, b = p.costs.line()
    assert len(p.costs.steps) >= 30 and abs(a - STEP_FIXED) < 1e-9 and abs(b - STEP_PER_TOKEN) < 1e-9, (a, b, len(p.costs.steps))


def test_the_budget_drafts_less_as_the_batch_fills_the_machine():
    costs = StepCosts()
    for n, t in [(1, 0.050), (9, 0.086)] * 20:  # a line fitted to timed steps: 4.5 ms a token
        costs.observe(n, t)
    a, b = costs.line()
    chain = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    alone = size_chains([chain], a, b, 8)[0]
    full = size_chains([chain] * 32, a, b, 8)
    assert alone >= 5 and max(full) < alone and sum(full) / 32 < 2, (alone, full)


def test_the_step_line_falls_back_to_the_prior_until_steps_vary():
    costs = StepCosts(prior_token_cost=0.1)
    for _ in range(30):
        costs.observe(2, 0.06)
    a, b = costs.line()
    assert abs(a + 2 * b - 0.06) < 1e-9 and abs(b / a - 0.1) < 1e-9


def test_no_draft_past_the_context():
    p, batch = PromptLookupProposer(config()), PersistentBatch()
    text = (REPEAT * 52)[: MAX_LEN - 2]
    drafts = batch.step(p, [text])
    assert len(drafts[0]) == 1, "one token fits before the end of the context"
    assert batch.step(p, drafts) == [[]], "none fits at the last position"


def test_speculative_config_names_the_class():
    cfg = speculative_config("hybrid", 6)
    assert cfg == {"method": "custom_class", "model": "specprobe.integrations.vllm.HybridProposer", "num_speculative_tokens": 6}
