"""`--backend auto` (backend_choice.py): the backend that runs a method faster, timed once and saved.

The timing runs on real models on both backends; what is kept, reused and said around it is tested
with the timing replaced, so no test depends on which backend is faster on the machine it runs on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import specprobe
from specprobe import backend_choice
from specprobe.backend_choice import CALIBRATION_PROMPTS, BackendChoice, BackendTrial, choose_backend, measure, pick
from specprobe.bench import summarize, to_markdown
from specprobe.commands.bench import auto_backends
from specprobe.commands.main import build_parser
from specprobe.errors import InvalidOptionError, ModelNotFoundError


def test_both_backends_are_timed_on_the_same_prompts(smollm2, smollm2_cpp):
    models = {"torch": smollm2, "llamacpp": smollm2_cpp}
    trials = measure(models, "pld", {}, prompts=CALIBRATION_PROMPTS[2:], tokens=24)  # the summary and the word problem
    assert [t.backend for t in trials] == ["torch", "llamacpp"]
    for t in trials:
        assert t.tokens_per_s > 0 and t.ms_per_forward > 0
        assert t.tau > 1.0, f"{t.backend}: no draft accepted in the calibration prompts"  # pld copies from the paragraph
    # the same greedy tokens on both, so tau differs only where the two backends' budgets do (pld: a fixed size)
    assert trials[0].tau == pytest.approx(trials[1].tau, rel=0.35)
    assert pick(trials).backend in ("torch", "llamacpp")


@pytest.fixture
def timed(monkeypatch, tmp_path):
    """choose_backend with the loading and timing replaced: llamacpp 70 tok/s, torch 30; the calls counted."""
    monkeypatch.setenv("SPECPROBE_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(backend_choice, "load", lambda name, backend="torch", **kw: backend)

    def fake_measure(models, method, options, log=None):
        calls.append((sorted(models), method, options))
        return [BackendTrial("torch", 30.0, 1.5, 50.0), BackendTrial("llamacpp", 70.0, 1.0, 14.3)]

    monkeypatch.setattr(backend_choice, "measure", fake_measure)
    return calls


def test_a_choice_is_measured_once_saved_and_read_back(timed):
    lines = []
    first = choose_backend("smollm2-135m", "hybrid", log=lines.append)
    assert first.backend == "llamacpp" and timed == [(["llamacpp", "torch"], "hybrid", {})]
    assert "70.0 tok/s" in lines[-1] and "2.33x" in lines[-1]
    saved = json.loads(Path(first.saved_at).read_text())
    assert saved["backend"] == "llamacpp" and [t["backend"] for t in saved["trials"]] == ["torch", "llamacpp"]
    again = choose_backend("smollm2-135m", "hybrid", log=lines.append)
    assert again.backend == "llamacpp" and again.trials == first.trials and len(timed) == 1 and "saved in" in lines[-1]
    choose_backend("smollm2-135m", "hybrid", {"budget": "8"}, log=None)  # other options: a choice of their own
    choose_backend("smollm2-135m", "pld", log=None)  # another method too
    assert len(timed) == 3 and timed[1][2] == {"budget": "8"}
    choose_backend("smollm2-135m", "hybrid", remeasure=True, log=None)
    assert len(timed) == 4
    Path(first.saved_at).write_text('{"backend": "llama')  # a damaged file is measured again, not an error
    assert choose_backend("smollm2-135m", "hybrid", log=None).backend == "llamacpp" and len(timed) == 5


def test_only_torch_where_llamacpp_cannot_run(timed, monkeypatch):
    said = []
    assert choose_backend("HuggingFaceTB/SmolLM2-135M-Instruct", "hybrid", log=said.append).backend == "torch"
    assert "GGUF files only" in said[-1]
    assert "hidden states" in choose_backend("smollm2-135m", "eagle", log=None).reason
    monkeypatch.setattr(specprobe.backends.llamacpp.library, "available", lambda: False)
    assert "not installed" in choose_backend("smollm2-135m", "hybrid", log=None).reason
    assert timed == []  # nothing was timed


def test_bad_input_is_one_line_before_any_timing(timed):
    with pytest.raises(ModelNotFoundError, match="no such GGUF file"):
        choose_backend("/nowhere/model.gguf", "hybrid", log=None)
    with pytest.raises(InvalidOptionError, match="unknown method"):
        choose_backend("smollm2-135m", "hybird", log=None)
    with pytest.raises(InvalidOptionError, match="choose_backend"):
        specprobe.load("smollm2-135m", backend="auto")
    assert timed == []


def test_the_bench_names_and_records_what_auto_chose(monkeypatch):
    monkeypatch.setattr(backend_choice, "choose_backend",
                        lambda name, method, options=None, **kw: BackendChoice("llamacpp" if method == "hybrid" else "torch", f"measured for {method}"))
    args = build_parser().parse_args(["bench", "--backend", "auto", "--out", "x", "--methods", "ar,suffix@auto,pld"])
    named = ["ar", "suffix@auto", "pld"]
    choices = auto_backends(args, named)
    assert args.backend == "llamacpp" and named == ["ar", "suffix@torch", "pld"]  # --backend auto: chosen for hybrid, the default method
    assert choices == {"--backend auto": {"backend": "llamacpp", "chosen_for": "hybrid", "reason": "measured for hybrid"},
                       "suffix@auto": {"backend": "torch", "chosen_for": "suffix", "reason": "measured for suffix"}}
    from test_bench import hand_made

    summary = summarize(hand_made(), ["ar", "esp"], settings={"backend_choices": choices})
    assert "suffix@auto: torch, chosen for suffix by `specprobe.choose_backend`: measured for suffix." in to_markdown(summary)


def test_generate_and_serve_run_on_the_backend_chosen_for_their_method(monkeypatch):
    from specprobe.commands.args import resolve_backend

    asked = []
    monkeypatch.setattr(backend_choice, "choose_backend", lambda name, method, options=None, **kw: asked.append((name, method, options)) or BackendChoice("llamacpp", "x"))
    for argv in (["generate", "--backend", "auto", "--method", "suffix", "hi"], ["serve", "--backend", "auto", "--method", "suffix"]):
        args = build_parser().parse_args(argv)
        resolve_backend(args, args.method, {"max_spec_tokens": 8})
        assert args.backend == "llamacpp"
    args = build_parser().parse_args(["generate", "--backend", "torch", "hi"])
    resolve_backend(args, args.method)
    assert args.backend == "torch" and asked == [("smollm2-135m", "suffix", {"max_spec_tokens": 8})] * 2
