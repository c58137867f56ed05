"""Continuous batching: many generations on one target, one speculative step each per forward.

Each round every active generation proposes (its pending token, its tree), the target runs all of
their rows in one forward (`protocol.forward_all`: together on a backend with `forward_many`:
llama.cpp with a KV stream per generation, torch with each generation's attention over its own
cache, backends/torch/many.py; one after another elsewhere), and each generation
accepts and commits its own part. Generations join between rounds and leave when they stop, as in
vLLM's scheduler or llama.cpp's server slots. A generation's tokens never depend on the others:
each row sees only its own cache and tree, and a backend's `forward_many` computes every row
exactly as a forward of that generation alone would.

The tree budget knows the batch: before proposing, each generation learns how many rows the others
ran last round and how many tokens they emitted (`Session.rows_beside`, `tokens_beside`), and
`--budget auto` chooses the tree that maximises the whole forward's tokens per second on the cost
curve at the batch's total rows (a tree that slows the forward delays the others' tokens too), so a
full batch drafts less and a lone request drafts exactly as it always has.

`Batcher` is the server's worker: one thread owns the target and runs the rounds; requests come
in as factories of `Generation` (built on that thread: a backend's context belongs to it) and
leave through a `concurrent.futures.Future`; other work on the target (loading it, a warm-up)
goes through `Batcher.call`, on the same thread. That thread should be the only one that ever runs
the model's kernels, loading included: both PyTorch and llama.cpp parallelise with OpenMP, whose
thread teams belong to the thread that started them, and with a second team alive libgomp sees
more threads than cores and stops spinning in its barriers (measured on 2 cores: a round of 13
SmolLM2 generations on the torch backend took 151-157 ms on a worker thread after the main thread
had loaded the model, 89-91 ms with everything on one thread; llama.cpp's decoding was 2.6x
slower). Hence `Batcher(None, n)`, the model loaded through `batcher.call`, then `batcher.target` set.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future
from typing import Callable

import torch

from .decode import Generation, GenerationStats
from .protocol import forward_all


def step_together(target, generations: list[Generation]) -> dict[Generation, BaseException]:
    """One round: every generation not yet stopped proposes, one shared forward verifies, each
    accepts and commits. Returns the generations whose drafter raised, with the error (they take
    no further part); an error of the forward itself propagates (it concerns them all)."""
    failed: dict[Generation, BaseException] = {}
    rows = sum(g.step_rows for g in generations)
    tokens = sum(g.step_tokens for g in generations)
    planned = []
    for g in generations:
        g.session.rows_beside = rows - g.step_rows
        g.session.tokens_beside = float(tokens - g.step_tokens)
        try:
            request = g.plan()
        except Exception as e:  # noqa: BLE001 - one request's drafter fails that request only
            failed[g] = e
            continue
        if request is not None:
            planned.append((g, request))
    outputs = forward_all(target, [r for _, r in planned])
    for (g, _), out in zip(planned, outputs):
        try:
            g.advance(out)
        except Exception as e:  # noqa: BLE001
            failed[g] = e
    return failed


Result = tuple[list[int], GenerationStats, str]  # (new ids, stats, stop reason), as decode returns


class Batcher:
    """Up to `max_batch` generations side by side on `target`, the rest waiting in arrival order."""

    def __init__(self, target, max_batch: int, name: str = "specprobe-batch"):
        """target: the backend the rounds run on (None: set it before submitting, once the model is
        loaded through `call`);
        max_batch: read before each admission, so it may be changed while the batcher runs."""
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.target = target
        self.max_batch = max_batch
        self._waiting: collections.deque[tuple[Future, Callable[[], Generation]]] = collections.deque()
        self._calls: collections.deque[tuple[Future, Callable[[], object]]] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.active = 0  # generations running now (read by /health and tests)
        self.rounds = 0  # forwards run so far
        self.largest_batch = 0  # the most generations one round has stepped together
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, make: Callable[[], Generation]) -> Future:
        """Queue a generation (`make` builds it on the worker thread); the future gives its Result,
        or the exception its building or stepping raised."""
        return self._enqueue(self._waiting, make)

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn()` on the worker thread between two rounds (the server's warm-up, a lone
        generation); the future gives its result. Work on the target belongs on this thread: a
        second thread driving llama.cpp gets a second OpenMP team, and libgomp, seeing more
        threads than cores, stops spinning in its barriers (measured: 2.6x slower decoding)."""
        return self._enqueue(self._calls, fn)

    def _enqueue(self, queue: collections.deque, fn: Callable) -> Future:
        """(a new future, fn) onto `queue`, the worker woken; the future is what the caller waits on."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            queue.append((future, fn))
            self._cond.notify()
        return future

    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                future, fn = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - reaches the caller through its future
                    future.set_exception(e)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _admit(self, active: list[tuple[Generation, Future]]) -> None:
        while len(active) < self.max_batch:
            with self._cond:
                if not self._waiting:
                    return
                future, make = self._waiting.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                active.append((make(), future))
            except BaseException as e:  # noqa: BLE001 - a bad request fails its own future
                future.set_exception(e)

    def _run(self) -> None:
        active: list[tuple[Generation, Future]] = []
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not active and not self._waiting and not self._calls and not self._closed:
                        self._cond.wait()
                    if self._closed and not active and not self._waiting and not self._calls:
                        return
                self._run_calls()
                self._admit(active)
                self.active = len(active)
                if not active:
                    continue
                self.largest_batch = max(self.largest_batch, len(active))
                try:
                    failed = step_together(self.target, [g for g, _ in active])
                except BaseException as e:  # noqa: BLE001 - the shared forward failed: every request in it fails
                    for g, future in active:
                        g.close()
                        future.set_exception(e)
                    active = []
                    continue
                self.rounds += 1
                still = []
                for g, future in active:
                    if g in failed:
                        g.close()
                        future.set_exception(failed[g])
                    elif g.stop is not None:
                        try:
                            future.set_result(g.finish())
                        except BaseException as e:  # noqa: BLE001 - the drafter's finish failed
                            future.set_exception(e)
                    else:
                        still.append((g, future))
                active = still
                self.active = len(active)
