"""The Spec-Bench harness: questions, answer files, summary math, resume, CLI errors, one tiny real run."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from conftest import SPEC_BENCH
from specprobe.bench import load_questions, parse_questions, run_bench, runner, select_questions, summarize, to_markdown, write_summary
from specprobe.bench.answers import TurnOutput, answer_path, read_answer_file, safe_name
from specprobe.commands import main as cli
from specprobe.errors import BenchError, InvalidOptionError

# --- questions -------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def q(qid, category, *turns):
    return {"question_id": qid, "category": category, "turns": list(turns) or [f"question {qid}?"]}


def test_load_spec_bench_local():
    questions = load_questions(str(SPEC_BENCH))
    assert len(questions) == 480
    assert len({x["category"] for x in questions}) == 13
    picked = load_questions(str(SPEC_BENCH), per_category=2)
    assert len(picked) == 26
    writing = [x["question_id"] for x in picked if x["category"] == "writing"]
    assert writing == [81, 82]  # the first two in file order


def test_select_questions():
    qs = [q(1, "a"), q(2, "b"), q(3, "a"), q(4, "a"), q(5, "c")]
    assert [x["question_id"] for x in select_questions(qs, per_category=2)] == [1, 2, 3, 5]
    assert [x["question_id"] for x in select_questions(qs, ["a", "c"], 1)] == [1, 5]
    with pytest.raises(InvalidOptionError, match="unknown category nope"):
        select_questions(qs, ["a", "nope"])
    with pytest.raises(InvalidOptionError, match="per-category"):
        select_questions(qs, per_category=0)


def test_malformed_questions(tmp_path):
    with pytest.raises(BenchError, match=r"bad.jsonl:2: not valid JSON"):
        parse_questions('{"question_id": 1, "category": "a", "turns": ["x"]}\n{oops\n', "bad.jsonl")
    with pytest.raises(BenchError, match=r"x:1: a question needs"):
        parse_questions('{"question_id": 1, "category": "a"}\n', "x")
    with pytest.raises(BenchError, match="appears twice"):
        parse_questions(json.dumps(q(1, "a")) + "\n" + json.dumps(q(1, "b")), "x")
    with pytest.raises(BenchError, match="cannot read"):
        load_questions(str(tmp_path / "missing.jsonl"))


def test_url_is_downloaded_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECPROBE_CACHE", str(tmp_path))
    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        return io.BytesIO((json.dumps(q(7, "a")) + "\n").encode())

    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    url = "https://example.org/data/question.jsonl"
    assert load_questions(url)[0]["question_id"] == 7
    assert load_questions(url)[0]["question_id"] == 7
    assert calls == [url]
    assert list((tmp_path / "spec_bench").glob("*question.jsonl"))


# --- summary math on hand-made answers -------------------------------------------------------


def rec(qid, category, method, new, wall, steps, ids=None, lengths=None, bound=(None, None), drafts=None, adapt=None):
    """An answer record with one turn."""
    return {
        "question_id": qid,
        "category": category,
        "model_id": "m",
        "method": method,
        "choices": [
            {
                "index": 0,
                "turns": ["t"],
                "decoding_steps": [steps],
                "new_tokens": [new],
                "wall_time": [wall],
                "accept_lengths": [lengths],
                "token_ids": [ids or list(range(new))],
                "bound_time": [bound[0]],
                "t1": [bound[1]],
                "draft_tokens": [drafts],
                "adapt_time": [adapt],
            }
        ],
        "tstamp": 0.0,
    }


def hand_made():
    return [
        rec(1, "A", "ar", 12, 1.2, 12),  # 10 tok/s
        rec(2, "B", "ar", 10, 2.0, 10),  # 5 tok/s
        rec(1, "A", "esp", 12, 0.4, 4, ids=list(range(12)), lengths=[3, 3, 3, 3], bound=(0.6, 0.1), drafts=12, adapt=0.1),  # 30 tok/s, tau 3
        rec(2, "B", "esp", 10, 2.0, 8, ids=[9] * 10, lengths=[2, 2, 1, 1, 1, 1, 1, 1], bound=(1.0, 0.1), drafts=8, adapt=0.5),  # 5 tok/s, differs from ar
        rec(1, "A", "hf-pld", 10, 0.5, None),
        rec(2, "B", "hf-pld", 10, 1.0, None),
        rec(3, "B", "ar", 10, 1.0, 10),  # only ar answered question 3: left out everywhere
    ]


def test_summary_math():
    records = hand_made()
    records[3]["choices"][0]["first_difference"] = {"turn": 0, "position": 0, "top2_gap": 0.0, "near_tie": True}  # esp's differing answer
    s = summarize(records, ["ar", "esp", "hf-pld"])
    esp, ar, pld = s["methods"]["esp"], s["methods"]["ar"], s["methods"]["hf-pld"]
    assert s["questions"] == 2 and s["left_out_questions"] == 1 and s["categories"] == ["A", "B"]
    assert ar["overall"]["n"] == 2 and ar["overall"]["speedup"] == 1.0 and ar["overall"]["identical_to_ar"] == 1.0
    assert esp["A"]["speedup"] == pytest.approx(3.0)
    assert esp["B"]["speedup"] == pytest.approx(1.0)
    # Spec-Bench: ratio of mean speeds (17.5 / 7.5), not the mean of per-question ratios (2.0)
    assert esp["overall"]["tokens_per_s"] == pytest.approx(17.5)
    assert esp["overall"]["speedup"] == pytest.approx(17.5 / 7.5)
    assert esp["overall"]["tau"] == pytest.approx(22 / 12)  # total tokens / total steps
    assert esp["overall"]["identical_to_ar"] == 0.5
    assert esp["A"]["identical_to_ar"] == 1.0 and esp["B"]["identical_to_ar"] == 0.0
    assert esp["overall"]["differs_at_near_tie"] == 0.5 and esp["A"]["differs_at_near_tie"] == 0.0 and ar["overall"]["differs_at_near_tie"] == 0.0
    assert pld["overall"]["tau"] is None and pld["overall"]["speedup"] == pytest.approx(15 / 7.5)
    assert s["accept_length_histogram"]["esp"] == {1: 6, 2: 2, 3: 4}
    # bound: new tokens x T(1) / sum of T(rows) = (12 x 0.1 + 10 x 0.1) / (0.6 + 1.0)
    assert esp["overall"]["bound"] == pytest.approx(2.2 / 1.6) and esp["A"]["bound"] == pytest.approx(2.0)
    assert ar["overall"]["bound"] is None and pld["overall"]["bound"] is None  # no cost-curve data
    # acceptance: accepted draft tokens (new - steps) / draft tokens = (8 + 2) / (12 + 8); per question in run order
    assert esp["overall"]["acceptance"] == pytest.approx(0.5) and s["acceptance_stream"]["esp"] == pytest.approx([8 / 12, 2 / 8])
    assert esp["overall"]["adapt_share"] == pytest.approx(0.6 / 2.4) and ar["overall"]["adapt_share"] is None
    md = to_markdown(s)
    assert "| esp | 1.83 | 50% | 17.5 | 2.33x | 1.38x | 170% | 50% | 50% | 2 |" in md and "esp 25%" in md
    assert "hf-pld: transformers does not report" in md and "1 question(s)" in md


def test_summary_without_ar():
    s = summarize([r for r in hand_made() if r["method"] != "ar"])
    cell = s["methods"]["esp"]["overall"]
    assert cell["speedup"] is None and cell["identical_to_ar"] is None
    assert "ar was not run" in to_markdown(s)


def test_write_summary_and_plots(tmp_path):
    for method in ("ar", "esp", "hf-pld"):
        write_jsonl(tmp_path / f"m-{method}.jsonl", [r for r in hand_made() if r["method"] == method])
    s = write_summary(tmp_path)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["methods"]["esp"]["overall"]["speedup"] == pytest.approx(s["methods"]["esp"]["overall"]["speedup"])
    assert set(on_disk["methods"]["esp"]) == {"overall", "A", "B"}
    assert set(on_disk["methods"]["esp"]["A"]) == {"tau", "acceptance", "adapt_share", "tokens_per_s", "speedup", "identical_to_ar", "differs_at_near_tie", "bound", "spread", "n"}
    for name in ("summary.md", "speedup.png", "accept_lengths.png", "acceptance_stream.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize("module", ["plots", "runner"])
def test_bench_doctests(module):
    import doctest
    import importlib

    failed, attempted = doctest.testmod(importlib.import_module(f"specprobe.bench.{module}"))
    assert failed == 0 and attempted > 0


# --- the runner, with a fake model (no forward passes) ----------------------------------------


class FakeLM:
    name = "org/fake model:v1"
    model = tokenizer = None  # never run: the tests replace run_turn and prepare


@pytest.fixture
def fake_turns(monkeypatch):
    """Replace the decoding of one turn; records (method, messages) of every call."""
    calls = []

    def fake_run_turn(lm, method, messages, max_new_tokens, options, draft_model=None):
        calls.append((method, [m["content"] for m in messages]))
        return TurnOutput(f"answer {len(calls)}", [1, 2, 3], 2, 0.1, [2, 1])

    monkeypatch.setattr(runner, "run_turn", fake_run_turn)
    monkeypatch.setattr(runner, "prepare", lambda *a, **k: 0.0)  # no engine to prepare for a fake model
    return calls


QS = [q(1, "a", "first?", "second?"), q(2, "b"), q(3, "a", "x?", "y?"), q(4, "b")]


def test_answer_files_and_interleaving(tmp_path, fake_turns):
    run_bench(FakeLM(), QS[:2], ["ar", "esp"], tmp_path, max_new_tokens=4, turns=2, progress=False)
    assert fake_turns[0][0] == "ar" and fake_turns[1][0] == "esp"  # one warm-up per method
    assert fake_turns[0][1] == [runner.WARMUP_PROMPT] and all(t[1] != [runner.WARMUP_PROMPT] for t in fake_turns[2:])  # never on a question
    runs = [m for m, msgs in fake_turns[2:] if len(msgs) == 1]
    assert runs == ["ar", "esp", "esp", "ar"]  # question by question, methods in turn, the order rotated per question
    assert ("ar", ["first?", "answer 3", "second?"]) in fake_turns  # turn 2 sees turn 1's answer
    path = answer_path(tmp_path, FakeLM.name, "esp")
    assert path.name == "org_fake_model_v1-esp.jsonl" == f"{safe_name(FakeLM.name)}-esp.jsonl"
    first, second = read_answer_file(path)
    assert {"question_id", "category", "answer_id", "model_id", "method", "choices", "tstamp"} <= first.keys()
    c = first["choices"][0]
    assert c["index"] == 0 and len(c["turns"]) == 2 and len(second["choices"][0]["turns"]) == 1
    for key in ("decoding_steps", "new_tokens", "wall_time", "accept_lengths_per_turn", "token_ids"):
        assert len(c[key]) == 2, key
    assert c["accept_lengths"] == [2, 1, 2, 1]  # one flat list per choice, as Spec-Bench's eval.py writes it
    assert c["accept_lengths_per_turn"][0] == [2, 1] and c["token_ids"][0] == [1, 2, 3] and c["new_tokens"] == [3, 3]
    for name in ("summary.json", "summary.md", "speedup.png", "accept_lengths.png", "settings.json"):
        assert (tmp_path / name).is_file()


def test_repeats_keep_the_median_and_report_the_spread(tmp_path, monkeypatch):
    walls = iter([0.1, 0.2, 0.9, 0.4, 0.3, 0.2] * 10)  # warm-ups take the first two

    def fake_run_turn(lm, method, messages, max_new_tokens, options, draft_model=None):
        return TurnOutput("a", [1, 2, 3, 4], 2, next(walls), [2, 2])

    monkeypatch.setattr(runner, "run_turn", fake_run_turn)
    monkeypatch.setattr(runner, "prepare", lambda *a, **k: 0.0)
    summary = run_bench(FakeLM(), QS[1:2], ["ar", "esp"], tmp_path, repeats=2, progress=False)
    ar, esp = (read_answer_file(answer_path(tmp_path, FakeLM.name, m))[0]["choices"][0] for m in ("ar", "esp"))
    # round 0: ar 0.9, esp 0.4; round 1 (rotated): esp 0.3, ar 0.2
    assert ar["wall_times"] == [[0.9, 0.2]] and ar["wall_time"] == [pytest.approx(0.55)]
    assert esp["wall_times"] == [[0.4, 0.3]] and esp["wall_time"] == [pytest.approx(0.35)]
    assert summary["methods"]["ar"]["overall"]["spread"] == pytest.approx(0.7 / 0.55)
    assert "2 runs of every (question, method)" in (tmp_path / "summary.md").read_text()
    with pytest.raises(InvalidOptionError, match="repeats"):
        run_bench(FakeLM(), QS, ["ar"], tmp_path / "x", repeats=0)


def test_disturbed_questions_are_flagged():
    recs = [rec(i, "A", "ar", 10, wall, 10) for i, wall in enumerate([1.0, 1.1, 0.9, 3.0, 1.0], 1)]
    assert [d["question_id"] for d in summarize(recs)["disturbed"]] == [4]
    assert "disturbed: questions" in to_markdown(summarize(recs))
    assert summarize(recs[:3] + recs[4:])["disturbed"] == []


def spec_bench_speed(answer_file, base_file):
    """What Spec-Bench's evaluation/speed.py does with two answer files (its arithmetic, tokens
    counted from new_tokens for both): mean tokens/s, baseline tokens/s, mean accepted tokens."""
    import numpy as np

    speeds, accept = [], []
    for line in open(answer_file, encoding="utf-8"):
        c = json.loads(line)["choices"][0]
        speeds.append(sum(c["new_tokens"]) / sum(c["wall_time"]))
        accept.extend(c["accept_lengths"])
    base = [sum(c["new_tokens"]) / sum(c["wall_time"]) for c in (json.loads(line)["choices"][0] for line in open(base_file, encoding="utf-8"))]
    return np.array(speeds).mean(), np.array(base).mean(), float(np.mean(accept))


def test_answer_files_read_as_spec_bench_does(tmp_path, fake_turns):
    run_bench(FakeLM(), QS, ["ar", "esp"], tmp_path, max_new_tokens=4, turns=2, progress=False)
    tps, base, accepted = spec_bench_speed(answer_path(tmp_path, FakeLM.name, "esp"), answer_path(tmp_path, FakeLM.name, "ar"))
    assert tps == pytest.approx(30.0) and base == pytest.approx(30.0)  # 3 tokens per 0.1 s per turn
    assert accepted == pytest.approx(1.5)  # the fake's accept lengths [2, 1] per turn


def test_resume_skips_done_pairs(tmp_path, fake_turns):
    run_bench(FakeLM(), QS[:2], ["ar", "esp"], tmp_path, progress=False)
    with pytest.raises(BenchError, match="--resume"):
        run_bench(FakeLM(), QS, ["ar", "esp"], tmp_path, progress=False)
    # an interrupted write left half a line behind
    with open(answer_path(tmp_path, FakeLM.name, "esp"), "a") as f:
        f.write('{"question_id": 3, "categ')
    fake_turns.clear()
    summary = run_bench(FakeLM(), QS, ["ar", "esp", "pld"], tmp_path, resume=True, progress=False)
    runs = [m for m, _ in fake_turns[3:]]  # after the 3 warm-ups
    assert runs == ["pld", "pld", "pld", "ar", "esp", "ar", "esp", "pld"]  # question 3 rotated by 2, question 4 by 3
    assert [r["question_id"] for r in read_answer_file(answer_path(tmp_path, FakeLM.name, "esp"))] == [1, 2, 3, 4]
    assert summary["questions"] == 4 and summary["methods"]["pld"]["overall"]["n"] == 4
    fake_turns.clear()
    run_bench(FakeLM(), QS, ["ar", "esp"], tmp_path, resume=True, progress=False)
    assert fake_turns == []  # nothing left: no warm-up either
    with pytest.raises(BenchError, match="max_new_tokens"):
        run_bench(FakeLM(), QS, ["ar"], tmp_path, resume=True, max_new_tokens=5, progress=False)


def test_runner_rejects_bad_arguments(tmp_path):
    with pytest.raises(InvalidOptionError, match="turns"):
        run_bench(FakeLM(), QS, ["ar"], tmp_path, turns=3)
    with pytest.raises(InvalidOptionError, match="needs a draft model"):
        run_bench(FakeLM(), QS, ["ar", "hf-assisted"], tmp_path)


# --- the command line --------------------------------------------------------------------------


def bench_cli(capsys, *argv):
    code = cli.main(["bench", *argv])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--methods", "ar,nope"], "unknown method nope"),
        (["--categories", "writing,poetry"], "unknown category poetry"),
        (["--per-category", "0"], "--per-category must be at least 1"),
        (["--methods", "ar,hf-assisted"], "needs a draft model"),
        (["--turns", "3"], "--turns must be 1 or 2"),
        (["--questions", "/nonexistent/q.jsonl"], "cannot read the questions file"),
    ],
)
def test_cli_bad_input(capsys, tmp_path, argv, needle):
    base = ["--questions", str(SPEC_BENCH), "--out", str(tmp_path / "out")]
    code, _, err = bench_cli(capsys, *base, *argv)
    assert code == 2 and len(err) == 1 and err[0].startswith("specprobe: error:") and needle in err[0], err


def test_cli_malformed_file_and_existing_out(capsys, tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps(q(1, "a")) + "\nnot json\n")
    code, _, err = bench_cli(capsys, "--questions", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and len(err) == 1 and "q.jsonl:2: not valid JSON" in err[0]
    (tmp_path / "o").mkdir()
    write_jsonl(tmp_path / "o" / "m-ar.jsonl", hand_made()[:1])
    code, _, err = bench_cli(capsys, "--questions", str(SPEC_BENCH), "--out", str(tmp_path / "o"))
    assert code == 2 and len(err) == 1 and "--resume" in err[0]


def test_cli_summarize_only(capsys, tmp_path):
    write_jsonl(tmp_path / "m-all.jsonl", hand_made())
    code, out, _ = bench_cli(capsys, "--summarize-only", "--out", str(tmp_path))
    assert code == 0 and "## Overall" in out and (tmp_path / "speedup.png").is_file()
    code, _, err = bench_cli(capsys, "--summarize-only", "--out", str(tmp_path / "empty"))
    assert code == 2 and "no answer files" in err[0]


def test_cli_subprocess_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "specprobe", "bench", "--questions", str(SPEC_BENCH), "--methods", "zzz", "--out", "/tmp/unused-specprobe-bench"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown method zzz" in proc.stderr


# --- end to end on a real model ------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Two intra-op threads on this shared 2-core machine slow a 135M model ~10x; one is steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_end_to_end_smollm2(smollm2, tmp_path, one_thread):
    questions = load_questions(str(SPEC_BENCH), ["writing", "qa"], per_category=1)
    summary = run_bench(smollm2, questions, ["ar", "hf", "esp"], tmp_path, max_new_tokens=16, progress=False)
    for method in ("ar", "hf", "esp"):
        assert answer_path(tmp_path, smollm2.name, method).is_file()
        for key in ("overall", "writing", "qa"):
            assert summary["methods"][method][key]["identical_to_ar"] == 1.0, (method, key)
    assert summary["methods"]["hf"]["overall"]["tau"] == 1.0
    assert summary["methods"]["esp"]["overall"]["tau"] >= 1.0
    for name in ("summary.json", "summary.md", "speedup.png", "accept_lengths.png"):
        assert (tmp_path / name).stat().st_size > 0
