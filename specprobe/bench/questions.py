"""Spec-Bench questions: the packaged set, a local file or a URL; parse, select.

The question file is JSONL, one object a line with `question_id`, `category` and `turns` (the
user messages of the conversation; MT-bench questions have two). The default, `spec-bench`, is
Spec-Bench's own file (480 questions, 13 categories), which ships inside this package
(`data/spec_bench/`, with its Apache-2.0 licence and provenance), so a bench runs offline. A
local path works as well, as does a URL (downloaded once and kept under
`specprobe.models.cache_root()/spec_bench/`), of any JSONL file with those three fields.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import BenchError, InvalidOptionError
from ..models import cache_root

DEFAULT_QUESTIONS = "spec-bench"  # the packaged copy of Spec-Bench's question.jsonl
PACKAGED = {"spec-bench": Path(__file__).parent / "data" / "spec_bench" / "question.jsonl"}
SPEC_BENCH_URL = "https://raw.githubusercontent.com/hemingkx/Spec-Bench/main/data/spec_bench/question.jsonl"


def packaged_questions(name: str = DEFAULT_QUESTIONS) -> Path:
    """The path of a question set shipped with specprobe."""
    return PACKAGED[name]


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def fetch(url: str, timeout: float = 30.0) -> Path:
    """The local copy of `url` under the cache, downloaded the first time."""
    name = Path(url.split("?")[0]).name or "questions.jsonl"
    path = cache_root() / "spec_bench" / f"{hashlib.sha1(url.encode()).hexdigest()[:10]}-{name}"
    if path.is_file():
        return path
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.rename(path)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise BenchError(f"cannot download the questions from {url} ({reason}); pass a local file with --questions") from None
    return path


def parse_questions(text: str, where: str) -> list[dict]:
    """The questions of a JSONL text; any bad line is an error naming `where` and the line."""
    questions, seen = [], set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchError(f"{where}:{n}: not valid JSON ({e.msg})") from None
        turns = q.get("turns") if isinstance(q, dict) else None
        if (
            not isinstance(q, dict)
            or not isinstance(q.get("question_id"), (int, str))
            or not isinstance(q.get("category"), str)
            or not isinstance(turns, list)
            or not turns
            or not all(isinstance(t, str) for t in turns)
        ):
            raise BenchError(f"{where}:{n}: a question needs question_id, category (a string) and turns (a list of strings)")
        if q["question_id"] in seen:
            raise BenchError(f"{where}:{n}: question_id {q['question_id']!r} appears twice")
        seen.add(q["question_id"])
        questions.append(q)
    if not questions:
        raise BenchError(f"{where}: no questions")
    return questions


def select_questions(questions: list[dict], categories: list[str] | None = None, per_category: int | None = None) -> list[dict]:
    """Keep the given categories (all by default) and the first `per_category` questions of each, in file order."""
    known = list(dict.fromkeys(q["category"] for q in questions))
    if categories:
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise InvalidOptionError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; the questions have {', '.join(known)}")
    if per_category is not None and (not isinstance(per_category, int) or per_category < 1):
        raise InvalidOptionError(f"--per-category must be a positive integer, got {per_category!r}")
    taken: dict[str, int] = {}
    out = []
    for q in questions:
        c = q["category"]
        if categories and c not in categories:
            continue
        if per_category is not None and taken.get(c, 0) >= per_category:
            continue
        taken[c] = taken.get(c, 0) + 1
        out.append(q)
    return out


def load_questions(source: str = DEFAULT_QUESTIONS, categories: list[str] | None = None, per_category: int | None = None) -> list[dict]:
    """Read the questions at `source` (`spec-bench`, the packaged set; a URL; or a path) and select
    them (see `select_questions`)."""
    if source in PACKAGED:
        path = PACKAGED[source]
    else:
        path = fetch(source) if is_url(source) else Path(source).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"cannot read the questions file {source}: {getattr(e, 'strerror', None) or e}") from None
    return select_questions(parse_questions(text, str(source)), categories, per_category)
