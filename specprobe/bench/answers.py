"""Answer files: one JSONL file per (model, method), in Spec-Bench's answer format.

A line is one question's answer, with the fields Spec-Bench's own inference scripts write
(`evaluation/eval.py`), so its `evaluation/speed.py` reads the files unchanged:

    {"question_id", "category", "answer_id", "model_id", "tstamp",
     "choices": [{"index": 0, "turns": [text, ...], "decoding_steps": [...], "new_tokens": [...],
                  "wall_time": [...], "accept_lengths": [n, n, ...]}]}

`turns`, `decoding_steps`, `new_tokens` and `wall_time` hold one entry per turn; `accept_lengths`
is ONE flat list (tokens committed per target forward, over all turns), empty for the
transformers rows other than `hf`, which do not expose it. `decoding_steps` counts target
forwards (for the transformers rows, by a forward hook on the target model).

specprobe's own fields, which Spec-Bench ignores: `method`, and per choice `accept_lengths_per_turn`
(the same lengths, a list per turn; null where unobserved), `token_ids`, `bound_time`, `t1`,
`draft_tokens`, `adapt_time`, with `--repeats N` `wall_times` (per turn, the N measured wall
times; `wall_time` is their median), and where `ar` ran on the same question in the same run
`first_difference` (null where token-identical to ar, else the first differing turn and position,
ar's top-2 logit gap there and whether that is a near-tie: divergence.py). Answer files written before this layout (`accept_lengths` a
list per turn) are still read.

Lines are appended and flushed one at a time, so an interrupted run loses at most the line being
written; readers skip such an incomplete last line.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BenchError
from ..store import locked

SETTINGS_FILE = "settings.json"
OVERALL = "overall"  # the summary's key for all categories together


@dataclass
class TurnOutput:
    """What one method produced for one turn."""

    text: str
    token_ids: list[int]
    decoding_steps: int | None  # target forwards; None where not observable
    wall_time: float
    accept_lengths: list[int] | None  # tokens committed per target forward
    bound_time: float | None = None  # sum over forwards of T(rows), from the target's cost curve
    t1: float | None = None  # T(1) of that curve
    draft_tokens: int | None = None  # draft tokens proposed (tree nodes, summed over forwards); None where not observable
    adapt_time: float | None = None  # seconds of the wall time spent adapting the drafter after the turn (omnidraft)
    wall_times: list[float] = field(default_factory=list)  # every measured wall time, with --repeats N


def safe_name(model: str) -> str:
    """A file-name-safe form of a model name (`org/model` -> `org_model`, a path -> its last part)."""
    path = Path(model.rstrip("/\\")).expanduser()
    if path.exists():
        model = path.stem if path.suffix == ".gguf" else path.name
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._")
    return name or "model"


def answer_path(out_dir: Path, model: str, method: str) -> Path:
    return Path(out_dir) / f"{safe_name(model)}-{method}.jsonl"


def answer_files(out_dir: Path) -> list[Path]:
    return sorted(Path(out_dir).glob("*.jsonl"))


def make_record(question: dict, model: str, method: str, turns: list[TurnOutput]) -> dict:
    choice = {
        "index": 0,
        "turns": [t.text for t in turns],
        "decoding_steps": [t.decoding_steps for t in turns],
        "new_tokens": [len(t.token_ids) for t in turns],
        "wall_time": [t.wall_time for t in turns],
        "accept_lengths": [n for t in turns for n in (t.accept_lengths or [])],  # flat, as Spec-Bench's eval.py
        "accept_lengths_per_turn": [t.accept_lengths for t in turns],
        "token_ids": [t.token_ids for t in turns],
        "bound_time": [t.bound_time for t in turns],
        "t1": [t.t1 for t in turns],
        "draft_tokens": [t.draft_tokens for t in turns],
        "adapt_time": [t.adapt_time for t in turns],
    }
    if any(len(t.wall_times) > 1 for t in turns):
        choice["wall_times"] = [t.wall_times for t in turns]
    return {
        "question_id": question["question_id"],
        "category": question["category"],
        "answer_id": uuid.uuid4().hex[:22],
        "model_id": model,
        "method": method,
        "choices": [choice],
        "tstamp": time.time(),
    }


def turn_accept_lengths(choice: dict) -> list[list[int] | None]:
    """Accept lengths per turn of an answer choice, from this layout or the one before it."""
    if "accept_lengths_per_turn" in choice:
        return choice["accept_lengths_per_turn"]
    lengths = choice.get("accept_lengths") or []
    if lengths and all(x is None or isinstance(x, list) for x in lengths):  # before: a list per turn
        return lengths
    return [lengths] if lengths else [None] * len(choice.get("new_tokens", []))


def median_turn(runs: list[TurnOutput]) -> TurnOutput:
    """One turn measured several times (--repeats): the first run's output with the median wall time."""
    first = runs[0]
    walls = [r.wall_time for r in runs]
    return TurnOutput(first.text, first.token_ids, first.decoding_steps, statistics.median(walls), first.accept_lengths,
                      first.bound_time, first.t1, first.draft_tokens, first.adapt_time, walls)


def _valid(record) -> bool:
    if not isinstance(record, dict) or not {"question_id", "category", "method", "choices"} <= record.keys():
        return False
    choices = record["choices"]
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return False
    c = choices[0]
    lists = [c.get(k) for k in ("new_tokens", "wall_time", "decoding_steps", "token_ids")]
    return all(isinstance(v, list) and len(v) == len(lists[0]) for v in lists) and bool(lists[0])


def read_answer_file(path: Path) -> list[dict]:
    """The records of one answer file; an incomplete last line (an interrupted write) is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"cannot read the answer file {path}: {getattr(e, 'strerror', None) or e}") from None
    lines = text.split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # the last line, without its newline: cut off mid-write
                break
            raise BenchError(f"{path}:{n}: not valid JSON") from None
        if not _valid(record):
            raise BenchError(f"{path}:{n}: not an answer record (question_id, category, method, choices[0] with per-turn lists)")
        records.append(record)
    return records


def read_answers(out_dir: Path) -> list[dict]:
    """Every record of every answer file in `out_dir`, file by file."""
    return [r for path in answer_files(out_dir) for r in read_answer_file(path)]


def cut_incomplete_tail(path: Path) -> None:
    """Drop an unfinished last line so the next appended record starts on a line of its own."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def append_record(path: Path, record: dict) -> None:
    """One line appended and flushed to disk under the file's lock; a line cut short by a crash is
    dropped by `cut_incomplete_tail` on --resume."""
    with locked(path), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
