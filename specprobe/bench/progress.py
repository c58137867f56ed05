"""Progress of a benchmark run: a rich progress bar with ETA on a terminal, else a line per question."""

from __future__ import annotations

import sys


def _speed(record: dict) -> str:
    c = record["choices"][0]
    wall = sum(c["wall_time"])
    line = f"{record['method']} {sum(c['new_tokens']) / wall if wall > 0 else 0.0:.1f} tok/s"
    if None not in c["decoding_steps"] and record["method"] not in ("ar", "hf"):
        line += f" (tau {sum(c['new_tokens']) / max(1, sum(c['decoding_steps'])):.2f})"
    return line


class LineProgress:
    """One short line on stderr per finished question."""

    def __init__(self, n_questions: int, n_runs: int, stream=None):
        self.n_questions, self.stream = n_questions, stream or sys.stderr
        self.done = 0
        print(f"specprobe bench: {n_runs} runs over {n_questions} questions", file=self.stream, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def start(self, question: dict, method: str) -> None:
        pass

    def finished(self, question: dict, method: str) -> None:
        pass

    def question_done(self, question: dict, records: list[dict]) -> None:
        self.done += 1
        speeds = "; ".join(_speed(r) for r in records)
        print(f"[{self.done}/{self.n_questions}] {question['question_id']} {question['category']}: {speeds}", file=self.stream, flush=True)


class RichProgress:
    """A progress bar over the (question x method) runs, with ETA."""

    def __init__(self, n_questions: int, n_runs: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
        )
        self.task = self.progress.add_task("bench", total=n_runs)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
        return False

    def start(self, question: dict, method: str) -> None:
        self.progress.update(self.task, description=f"{question['question_id']} {question['category']} · {method}"[:28])

    def finished(self, question: dict, method: str) -> None:
        self.progress.advance(self.task)

    def question_done(self, question: dict, records: list[dict]) -> None:
        pass


def make_progress(n_questions: int, n_runs: int, bar: bool | None = None) -> LineProgress | RichProgress:
    """The bar when `bar` is true, or when it is None and stderr is a terminal; lines otherwise."""
    if bar is None:
        bar = sys.stderr.isatty()
    return RichProgress(n_questions, n_runs) if bar else LineProgress(n_questions, n_runs)
