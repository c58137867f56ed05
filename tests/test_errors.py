"""Every bad input gives one clear line (CLI, exit status 2) or a typed exception (API)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import specprobe
from specprobe.backends.torch import TorchBackend
from specprobe.drafters import make_drafter
from specprobe.engine.decode import decode


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "specprobe", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )


def assert_one_line(code: int, stderr: str, needle: str) -> None:
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr
    assert lines[-1].startswith("specprobe: error:") or "error:" in lines[-1], stderr
    assert needle in stderr, stderr


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert_one_line(proc.returncode, proc.stderr, needle)


def test_cli_unknown_model():
    assert_one_line_error(run_cli("generate", "--model", "no-such-model-xyz", "hi"), "no-such-model-xyz")


def test_cli_missing_gguf_file(tmp_path):
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path / "missing.gguf"), "hi"), "no such GGUF file")


def test_cli_not_a_model_directory(tmp_path):
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path), "hi"), "cannot load model")


BAD_OPTIONS = [
    (("generate", "--mask-init", "nonsense", "hi"), "mask_init"),
    (("generate", "--method", "pld", "--max-ngram", "0", "hi"), "max_ngram"),
    (("generate", "--method", "draft", "hi"), "--draft-model"),
    (("generate", "--method", "eagle", "hi"), "--head"),
    (("serve", "--method", "omnidraft"), "--draft-model"),
    (("train-head", "--data", "/no/such/chats.jsonl", "--out", "x"), "no such file"),
    (("train-head", "--epochs", "0", "--out", "x"), "--epochs"),
]


def test_cli_bad_option_fails_before_loading(monkeypatch, capsys):
    """One case as a user runs it (a process of its own); the rest through the same `main`, in
    this process, with loading a model made an error: each must fail on the option first."""
    assert_one_line_error(run_cli("generate", "--budget", "0", "hi"), "budget")
    from specprobe import models
    from specprobe.commands.main import main

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad option was reported")

    monkeypatch.setattr(models, "load", no_loading)
    monkeypatch.setattr(models, "load_draft", no_loading, raising=False)
    for argv, needle in BAD_OPTIONS:
        code = main(list(argv))
        assert_one_line(code, capsys.readouterr().err, needle)


def test_cli_prompt_too_long():
    long_prompt = "word " * 9000  # SmolLM2's context is 8192 tokens
    assert_one_line_error(run_cli("generate", "--model", "smollm2-135m", long_prompt), "context")


def test_api_errors(smollm2):
    with pytest.raises(specprobe.ModelNotFoundError):
        specprobe.load("/nonexistent/dir/model.gguf")
    with pytest.raises(specprobe.InvalidOptionError):
        specprobe.generate(smollm2.model, smollm2.tokenizer, "hi", method="nope")
    with pytest.raises(specprobe.InvalidOptionError):
        specprobe.generate(smollm2.model, smollm2.tokenizer, "hi", method="esp", bogus=1)
    with pytest.raises(specprobe.InvalidOptionError):
        specprobe.generate(smollm2.model, smollm2.tokenizer, "hi", max_new_tokens=0)
    with pytest.raises(specprobe.PromptTooLongError):
        specprobe.generate(smollm2.model, smollm2.tokenizer, list(range(10)) * 900, method="esp")
    with pytest.raises(specprobe.InvalidOptionError):
        specprobe.generate(smollm2.model, smollm2.tokenizer, [{"role": "robot", "content": "x"}])
    assert issubclass(specprobe.PromptTooLongError, specprobe.SpecProbeError)


def test_generation_stops_at_the_context_limit(smollm2):
    target = TorchBackend(smollm2.model)
    target.max_length = 40  # pretend the context is tiny
    prompt = smollm2.tokenizer("Count: one two three four five six seven eight nine ten").input_ids
    ids, stats, stop = decode(target, prompt, make_drafter("esp"), 100, eos_ids=set())
    assert stop == "context"
    assert len(prompt) + len(ids) == 40
    ref, _, _ = decode(TorchBackend(smollm2.model), prompt, make_drafter("ar"), len(ids), eos_ids=set())
    assert ids == ref
