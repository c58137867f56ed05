"""State that outlives a generation has one owner: the model's backend, kept on the model itself
and holding the model only weakly. Dropping the model frees everything; what a backend learns
across requests is scoped, so one method never drafts from what another method served."""

from __future__ import annotations

import gc
import weakref

import pytest

import specprobe
from specprobe.api import target_of
from specprobe.backends.torch import TorchBackend
from specprobe.errors import InvalidOptionError


def test_a_dropped_model_is_freed():
    lm = specprobe.load("smollm2-135m")
    for method in ("hybrid", "lookahead", "ar"):
        specprobe.generate(lm.model, lm.tokenizer, "Hi there", method=method, max_new_tokens=6)
    backend = weakref.ref(TorchBackend.of(lm.model))
    model = weakref.ref(lm.model)
    del lm
    gc.collect()
    assert model() is None and backend() is None


def test_the_backend_is_built_once_and_kept_by_the_model(smollm2):
    assert TorchBackend.of(smollm2.model) is TorchBackend.of(smollm2.model) is target_of(smollm2.model)
    assert TorchBackend.of(smollm2.model).model is smollm2.model


def test_learning_scopes_keep_methods_apart(smollm2):
    backend = TorchBackend.of(smollm2.model)
    try:
        backend.learning_scope("scope-test-ar")
        specprobe.generate(smollm2.model, smollm2.tokenizer, "Name three colours.", method="ar", max_new_tokens=8)
        seen = backend.learning_scope("scope-test-ar").frequencies.distinct
        other = backend.learning_scope("scope-test-other")
        assert seen > 0 and other.frequencies.distinct == 0  # nothing of ar's request reached the other scope
    finally:
        backend.learning_scope("default")


def test_mask_init_token_text_reads_the_sessions_tokenizer(smollm2):
    prompt = "Write a haiku about rain."
    ref = specprobe.generate(smollm2.model, smollm2.tokenizer, prompt, method="ar", max_new_tokens=12)
    out = specprobe.generate(smollm2.model, smollm2.tokenizer, prompt, method="esp", max_new_tokens=12, mask_init="token:Hello")
    assert out.token_ids == ref.token_ids
    with pytest.raises(InvalidOptionError, match="not a token id or a token"):
        specprobe.generate(smollm2.model, smollm2.tokenizer, prompt, method="esp", max_new_tokens=2, mask_init="token:no such token here")
