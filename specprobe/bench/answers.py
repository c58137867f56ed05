"""Answer files: one JSONL file per (model, method), in Spec-Bench's answer format.

A line is one question's answer:

    {"question_id", "category", "model_id", "method", "tstamp",
     "choices": [{"index": 0, "turns": [text, ...], "decoding_steps": [...], "new_tokens": [...],
                  "wall_time": [...], "accept_lengths": [[...], ...], "token_ids": [[...], ...]}]}

with one entry per turn in every list. `decoding_steps` counts target forwards (for the
transformers rows, by a forward hook on the target model; null in answer files from before that);
`accept_lengths` is null for the transformers rows other than `hf`, which do not expose it. Lines are appended and flushed one at a time, so an interrupted run
loses at most the line being written; readers skip such an incomplete last line.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BenchError

SETTINGS_FILE = "settings.json"


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
    return {
        "question_id": question["question_id"],
        "category": question["category"],
        "model_id": model,
        "method": method,
        "choices": [
            {
                "index": 0,
                "turns": [t.text for t in turns],
                "decoding_steps": [t.decoding_steps for t in turns],
                "new_tokens": [len(t.token_ids) for t in turns],
                "wall_time": [t.wall_time for t in turns],
                "accept_lengths": [t.accept_lengths for t in turns],
                "token_ids": [t.token_ids for t in turns],
                "bound_time": [t.bound_time for t in turns],
                "t1": [t.t1 for t in turns],
                "draft_tokens": [t.draft_tokens for t in turns],
                "adapt_time": [t.adapt_time for t in turns],
            }
        ],
        "tstamp": time.time(),
    }


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
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
