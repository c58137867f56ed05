"""Continuous batching (engine/batch.py): generations stepped side by side, joining and leaving
mid-generation, each one's output equal to the same request run alone.

On llama.cpp the generations share one decode per round, each in a KV stream of its own
(`streams`); on the torch backend their rows share one forward of the model, each generation's
attention over its own cache (backends/torch/many.py). Greedy outputs must be token-identical to
the request alone (and to plain decoding), sampled ones equal for the same seed; the budget must
draft less beside a full batch.
"""

from __future__ import annotations

import pytest

import specprobe
from specprobe.api import generate, new_generation, target_of
from specprobe.backends.llamacpp.library import available
from specprobe.backends.torch.many import ManyCache
from specprobe.engine.batch import Batcher
from specprobe.engine.budget import AutoBudget
from tests.conftest import varied_prompts

needs_llamacpp = pytest.mark.skipif(not available(), reason="llama-cpp-python is not installed")
pytestmark = pytest.mark.xdist_group("batch")

LENGTHS = [28, 8, 20, 4, 24, 14]  # different lengths: requests leave at different rounds


@pytest.fixture(scope="module")
def smollm2_streams():
    return specprobe.load("smollm2-135m", backend="llamacpp", streams=4)


@pytest.fixture(scope="module")
def gemma3_streams():
    return specprobe.load("gemma3-270m", backend="llamacpp", streams=3)


def _batched(lm, prompts, lengths, max_batch, late_from=3, **options):
    """Run the requests through a Batcher: the first `late_from` at once, each later one joining
    when the request before it has emitted its first step (mid-generation). Returns the results
    in order and the batcher."""
    batcher = Batcher(target_of(lm.model), max_batch)
    futures = [None] * len(prompts)

    def make(k):
        joined = []

        def on_tokens(ids):  # runs on the batcher's thread, between two rounds
            if k + 1 < len(prompts) and k + 1 >= late_from and not joined:
                joined.append(True)
                futures[k + 1] = batcher.submit(make(k + 1))

        return lambda: new_generation(lm.model, lm.tokenizer, prompts[k], max_new_tokens=lengths[k], on_tokens=on_tokens, **options)

    for i in range(min(late_from, len(prompts))):
        futures[i] = batcher.submit(make(i))
    results = []
    for i in range(len(prompts)):
        while futures[i] is None:  # submitted by an earlier request's callback
            futures[i - 1].result(timeout=600)
        results.append(futures[i].result(timeout=600))
    batcher.close()
    return results, batcher


def _check_alone(lm, prompts, lengths, results, **options):
    """Each batched greedy output equals plain decoding (`ar`) of the request alone, which every
    method's output alone equals (test_llamacpp.py; on torch test_budget_hybrid.py, test_parity_ngram.py); returns the drafted
    tokens the batched generations accepted."""
    accepted = 0
    for prompt, n, (ids, stats, _) in zip(prompts, lengths, results):
        assert ids == generate(lm.model, lm.tokenizer, prompt, method="ar", max_new_tokens=n, **options).token_ids
        accepted += sum(a - 1 for a in stats.accept_lengths)
    return accepted


@needs_llamacpp
@pytest.mark.parametrize("model_name, method", [("smollm2_streams", "suffix"), ("smollm2_streams", "hybrid"), ("gemma3_streams", "pld")])
def test_llamacpp_streams_batched_equals_alone(request, spec_bench_questions, model_name, method):
    lm = request.getfixturevalue(model_name)
    prompts = varied_prompts(spec_bench_questions, len(LENGTHS))
    results, batcher = _batched(lm, prompts, LENGTHS, max_batch=lm.model.streams, method=method)
    assert batcher.largest_batch == lm.model.streams  # the batch was full at some round
    assert batcher.rounds < sum(len(r[0]) for r in results)  # rows of several requests shared forwards
    assert _check_alone(lm, prompts, LENGTHS, results) > 0  # drafts were accepted


@needs_llamacpp
def test_llamacpp_streams_sampling_same_seed_same_text(smollm2_streams, spec_bench_questions):
    prompts = varied_prompts(spec_bench_questions, 4)
    lengths = LENGTHS[:4]
    options = dict(temperature=0.8, top_p=0.95, seed=1234)
    results, batcher = _batched(smollm2_streams, prompts, lengths, max_batch=4, method="suffix", **options)
    assert batcher.largest_batch > 1
    for prompt, n, (ids, _, _) in zip(prompts, lengths, results):
        alone = generate(smollm2_streams.model, smollm2_streams.tokenizer, prompt, method="suffix", max_new_tokens=n, **options)
        assert ids == alone.token_ids
    other = generate(smollm2_streams.model, smollm2_streams.tokenizer, prompts[0], method="suffix", max_new_tokens=lengths[0], **{**options, "seed": 99})
    assert other.token_ids != results[0][0]  # negative control: another seed gives another text


@needs_llamacpp
def test_stream_limit_is_a_clear_error(smollm2_streams):
    target = target_of(smollm2_streams.model)
    caches = [target.new_cache() for _ in range(smollm2_streams.model.streams)]
    try:
        with pytest.raises(RuntimeError, match="streams of this llama.cpp context are in use"):
            target.new_cache()
    finally:
        for c in caches:
            target.release(c)


class _ForwardCounter:
    """Counts the target decoder's forwards, and those that carried several generations' rows."""

    def __init__(self, lm):
        self.calls = self.shared = 0
        self.handle = target_of(lm.model).decoder.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        self.calls += 1
        self.shared += isinstance(kwargs.get("cache", kwargs.get("past_key_values")), ManyCache)


def _long_and_short(questions: list[dict], n: int) -> list[str]:
    """The shortest first turn of over 2,500 characters (past Gemma3's 512-token sliding window)
    and n - 1 varied others."""
    long = min((q["turns"][0] for q in questions if len(q["turns"][0]) > 2500), key=len)
    return [long] + [p for p in varied_prompts(questions, n) if p != long][: n - 1]


@pytest.mark.parametrize("model_name, method", [("smollm2", "hybrid"), ("gemma3", "pld")])
def test_torch_backend_shares_forwards_equals_alone(request, spec_bench_questions, model_name, method):
    lm = request.getfixturevalue(model_name)
    prompts = _long_and_short(spec_bench_questions, 4)
    lengths = [16, 6, 12, 8]
    target_of(lm.model).cost_curve()  # measured once per machine, with forwards of its own: not to be counted
    counter = _ForwardCounter(lm)
    try:
        results, batcher = _batched(lm, prompts, lengths, max_batch=3, late_from=2, method=method)
    finally:
        counter.handle.remove()
    assert batcher.largest_batch == 3
    assert counter.shared > 0  # several generations' rows went through one forward
    assert counter.calls < sum(r[1].target_forwards for r in results)  # fewer forwards than the generations' steps
    assert _check_alone(lm, prompts, lengths, results) > 0  # drafts were accepted


def test_torch_backend_sampling_same_seed_same_text(smollm2, spec_bench_questions):
    prompts = varied_prompts(spec_bench_questions, 3)
    lengths = [16, 10, 12]
    options = dict(temperature=0.8, top_p=0.95, seed=1234)
    results, batcher = _batched(smollm2, prompts, lengths, max_batch=3, method="hybrid", **options)
    assert batcher.largest_batch == 3
    for prompt, n, (ids, _, _) in zip(prompts, lengths, results):
        assert ids == generate(smollm2.model, smollm2.tokenizer, prompt, method="hybrid", max_new_tokens=n, **options).token_ids
    other = generate(smollm2.model, smollm2.tokenizer, prompts[0], method="hybrid", max_new_tokens=lengths[0], **{**options, "seed": 99})
    assert other.token_ids != results[0][0]  # negative control: another seed gives another text


class _Target:
    """A cost curve where rows are cheap up to 8, then each row costs as much as the first."""

    def __init__(self):
        self.state = {}

    def cost_curve(self):
        return {1: 1.0, 8: 1.1, 16: 9.0, 32: 25.0}

    def drafter_state(self):
        return self.state


class _Session:
    rows_beside = 0


def test_budget_drafts_less_beside_a_full_batch():
    session = _Session()
    auto = AutoBudget(_Target(), session=session)
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    alone = auto.choose(scores, rows=lambda n: 1 + n)
    session.rows_beside, session.tokens_beside = 14, 14.0  # 14 other generations, one row and one token each
    beside = auto.choose(scores, rows=lambda n: 1 + n)
    assert alone == 7 and beside == 0


@needs_llamacpp
def test_server_serves_requests_side_by_side(smollm2_streams, spec_bench_questions):
    import openai

    from specprobe.server import Served
    from tests.test_server import _start

    served = Served(smollm2_streams, "smollm2-135m", "suffix", {}, max_queue=8, max_batch=4)
    srv, thread, url = _start(served)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        prompts = varied_prompts(spec_bench_questions, 4)

        def ask(i):
            kwargs = dict(model="smollm2-135m", messages=[{"role": "user", "content": prompts[i]}], max_tokens=LENGTHS[i])
            if i % 2:
                return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs) if c.choices)
            return client.chat.completions.create(**kwargs).choices[0].message.content

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(ask, range(4)))
        for i, text in enumerate(texts):
            alone = generate(smollm2_streams.model, smollm2_streams.tokenizer, [{"role": "user", "content": prompts[i]}], method="suffix", max_new_tokens=LENGTHS[i])
            assert text == alone.text
        assert served.batcher.largest_batch > 1  # they did run side by side
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        served.batcher.close()
