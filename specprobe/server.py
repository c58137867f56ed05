"""`specprobe serve`: an OpenAI-compatible HTTP server on the speculative engine (FastAPI + uvicorn).

    POST /v1/chat/completions   POST /v1/completions     (stream or not; max_tokens, temperature,
                                                           top_p, seed, stop, stream)
    GET  /v1/models             GET  /health             GET  /metrics (Prometheus text)

One model in memory serves every client, one generation at a time (the engine's forward uses all
cores); requests beyond `max_queue` (running + waiting) get 429 with Retry-After. A streaming
client that disconnects cancels its generation at the next step. Each generation owns its KV cache
and drops it when it ends. Bad input gets an OpenAI-style error object (400; 404 for an unknown
model), never a traceback. Responses carry the usual `usage` plus a `specprobe` field with the
decoding statistics (method, tau, target forwards), which OpenAI clients ignore.
"""


import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .errors import SpecProbeError

ROLES = ("system", "user", "assistant")
DEFAULT_MAX_TOKENS = 128


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class Cancelled(Exception):
    """The client went away before its generation started or while it ran."""


@dataclass
class Params:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool


@dataclass
class Metrics:
    ok: int = 0
    errors: int = 0
    rejected: int = 0
    cancelled: int = 0
    tokens: int = 0
    forwards: int = 0
    generation_seconds: float = 0.0
    queued: int = 0  # running + waiting

    def prometheus(self) -> str:
        tau = self.tokens / self.forwards if self.forwards else 0.0
        tps = self.tokens / self.generation_seconds if self.generation_seconds else 0.0
        rows = [
            ("specprobe_requests_total", "counter", "requests by outcome",
             [('status="ok"', self.ok), ('status="error"', self.errors), ('status="rejected"', self.rejected), ('status="cancelled"', self.cancelled)]),
            ("specprobe_generated_tokens_total", "counter", "tokens generated", [("", self.tokens)]),
            ("specprobe_target_forwards_total", "counter", "target model forwards", [("", self.forwards)]),
            ("specprobe_tau", "gauge", "generated tokens per target forward, since start", [("", round(tau, 4))]),
            ("specprobe_tokens_per_second", "gauge", "generated tokens per second of generation, since start", [("", round(tps, 3))]),
            ("specprobe_queue_length", "gauge", "requests running or waiting", [("", self.queued)]),
        ]
        out = []
        for name, kind, help_, samples in rows:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
            out += [f"{name}{{{labels}}} {value}" if labels else f"{name} {value}" for labels, value in samples]
        return "\n".join(out) + "\n"


class TextAssembler:
    """Token ids in, text deltas out: holds back a possible prefix of a stop string and an
    incomplete character, and reports the first stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0  # characters already emitted
        self.stopped = False
        self.text = ""

    def add(self, ids: list[int]) -> str:
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            text = text[: min(hits)]
            ready = len(text)
        else:
            hold = max((len(s) - 1 for s in self.stop), default=0)
            ready = len(text) - hold
            if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
                ready = min(ready, len(text) - 1)
        self.text = text
        delta = text[self.sent : max(self.sent, ready)]
        self.sent += len(delta)
        return delta

    def rest(self) -> str:
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta


@dataclass
class Served:
    lm: object
    name: str
    method: str
    options: dict = field(default_factory=dict)
    max_queue: int = 8
    metrics: Metrics = field(default_factory=Metrics)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one generation at a time
    # every generation runs on this one thread: one at a time, and no per-request thread whose
    # allocations would scatter over new malloc arenas (resident memory would creep up)
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="specprobe-generate"))
    admit_lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self) -> None:
        with self.admit_lock:
            if self.metrics.queued >= self.max_queue:
                self.metrics.rejected += 1
                raise RequestError(429, f"the server is busy ({self.max_queue} requests running or waiting); retry shortly", code="rate_limit_exceeded")
            self.metrics.queued += 1

    def release(self) -> None:
        with self.admit_lock:
            self.metrics.queued -= 1

    def generate(self, p: Params, on_delta, cancel: threading.Event):
        """Runs in a worker thread. Returns (text, finish_reason, stats); raises Cancelled when the
        client went away. A stop string or a cancel ends the generation through the loop's own
        stop (the token callback returns True), so the drafter's `finish` runs and the statistics
        count what was generated."""
        from .api import generate

        assembler = TextAssembler(self.lm.tokenizer, p.stop)

        def on_tokens(ids: list[int]) -> bool:
            if cancel.is_set():
                return True
            delta = assembler.add(ids)
            if delta:
                on_delta(delta)
            return assembler.stopped

        with self.lock:
            if cancel.is_set():
                raise Cancelled()
            t0 = time.perf_counter()
            result = generate(
                self.lm.model, self.lm.tokenizer, p.prompt_ids, method=self.method, max_new_tokens=p.max_tokens,
                on_tokens=on_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed, **self.options,
            )
            elapsed = time.perf_counter() - t0
        _release_freed_memory()
        if cancel.is_set() and not assembler.stopped:
            raise Cancelled()
        stats = result.stats
        reason = "stop" if result.stop_reason in ("eos", "stop") else "length"
        tail = assembler.rest() if not assembler.stopped else ""
        if tail:
            on_delta(tail)
        n_tokens = len(assembler.ids)
        with self.admit_lock:
            self.metrics.tokens += n_tokens
            self.metrics.forwards += stats.target_forwards
            self.metrics.generation_seconds += elapsed
        info = {
            "method": self.method,
            "completion_tokens": n_tokens,
            "target_forwards": stats.target_forwards,
            "tau": stats.tau,
            "tokens_per_s": n_tokens / elapsed if elapsed > 0 else None,
        }
        return assembler.text, reason, info


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc): each request's KV cache grows by many
    reallocations, and without a trim the freed pieces keep the resident size creeping up."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


# -- request parsing -------------------------------------------------------------------------------
def _number(body: dict, key: str, default, low=None, high=None, integer=False):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RequestError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(400, f"'{key}' must be in [{low}, {high}], got {value!r}", key)
    return value


def parse_request(body, served: Served, chat: bool) -> Params:
    from .models import format_prompt

    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served.name:
        raise RequestError(404, f"the model '{model}' does not exist; this server serves '{served.name}'", "model", "model_not_found")
    tokenizer = served.lm.tokenizer
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' must be a non-empty list", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise RequestError(400, f"messages[{i}]: 'role' must be one of {', '.join(ROLES)}", "messages")
            if not isinstance(m.get("content"), str):
                raise RequestError(400, f"messages[{i}]: 'content' must be a string", "messages")
        ids = format_prompt(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages])
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "'prompt' must be a non-empty string", "prompt")
        ids = format_prompt(tokenizer, prompt, chat=False)
    context = served_context(served)
    max_tokens = _number(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, None, integer=True)
    if body.get("max_completion_tokens") is not None:
        max_tokens = _number(body, "max_completion_tokens", max_tokens, 1, None, integer=True)
    if len(ids) >= context:
        raise RequestError(400, f"the prompt has {len(ids)} tokens; the model's context is {context}", "messages" if chat else "prompt", "context_length_exceeded")
    if len(ids) + max_tokens > context:
        raise RequestError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context of {context} tokens", "max_tokens", "context_length_exceeded")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "'stop' must be a non-empty string or a list of at most 4 of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be a boolean", "stream")
    n = body.get("n", 1)
    if n != 1:
        raise RequestError(400, "only n = 1 is supported", "n")
    return Params(
        ids,
        max_tokens,
        float(_number(body, "temperature", 0.0, 0.0, 2.0)),
        float(_number(body, "top_p", 1.0, 1e-9, 1.0)),
        _number(body, "seed", None, integer=True),
        stop,
        stream,
    )


def served_context(served: Served) -> int:
    from .api import target_of

    return target_of(served.lm.model).max_length


# -- the app ---------------------------------------------------------------------------------------
def create_app(served: Served):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="specprobe", version="1")

    def error(e: RequestError) -> JSONResponse:
        kind = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(e.status, "server_error")
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}, e.status, headers=headers)

    @app.exception_handler(Exception)
    async def any_error(request, exc):  # never a traceback to the client; the server keeps serving
        served.metrics.errors += 1
        return error(RequestError(500, f"internal error: {type(exc).__name__}"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "method": served.method}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0, "owned_by": "specprobe"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(served.metrics.prometheus(), media_type="text/plain; version=0.0.4")

    async def complete(request: Request, chat: bool):
        try:
            raw = await request.body()
            try:
                body = json.loads(raw or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"malformed JSON: {e}") from None
            params = parse_request(body, served, chat)
            served.admit()
        except RequestError as e:
            if e.status != 429:
                served.metrics.errors += 1
            return error(e)
        except SpecProbeError as e:
            served.metrics.errors += 1
            return error(RequestError(400, str(e)))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        base = {"id": rid, "created": created, "model": served.name}
        cancel = threading.Event()
        usage = lambda info: {"prompt_tokens": len(params.prompt_ids), "completion_tokens": info["completion_tokens"], "total_tokens": len(params.prompt_ids) + info["completion_tokens"]}

        if not params.stream:
            try:
                text, reason, info = await asyncio.wrap_future(served.executor.submit(served.generate, params, lambda d: None, cancel))
            except SpecProbeError as e:
                served.metrics.errors += 1
                return error(RequestError(400, str(e)))
            finally:
                served.release()
            served.metrics.ok += 1
            choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text, "logprobs": None}
            choice["finish_reason"] = reason
            kind = "chat.completion" if chat else "text_completion"
            return JSONResponse({**base, "object": kind, "choices": [choice], "usage": usage(info), "specprobe": info})

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        kind = "chat.completion.chunk" if chat else "text_completion"

        def on_delta(delta: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("delta", delta))

        def work():
            try:
                result = served.generate(params, on_delta, cancel)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", result))
            except Cancelled:
                served.metrics.cancelled += 1
                loop.call_soon_threadsafe(queue.put_nowait, ("cancelled", None))
            except Exception as e:  # noqa: BLE001 - reported to the client as an error chunk
                served.metrics.errors += 1
                loop.call_soon_threadsafe(queue.put_nowait, ("error", str(e)))
            finally:
                served.release()

        def chunk(content: str | None, reason=None, extra=None) -> str:
            if chat:
                delta = {} if content is None else {"content": content}
                c = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                c = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": reason}
            return "data: " + json.dumps({**base, "object": kind, "choices": [c], **(extra or {})}) + "\n\n"

        async def events():
            served.executor.submit(work)
            if chat:
                yield "data: " + json.dumps({**base, "object": kind, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}) + "\n\n"
            try:
                while True:
                    try:
                        what, value = await asyncio.wait_for(queue.get(), timeout=0.25)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            cancel.set()
                            return
                        continue
                    if what == "delta":
                        yield chunk(value)
                    elif what == "done":
                        _, reason, info = value
                        served.metrics.ok += 1
                        yield chunk(None, reason, {"usage": usage(info), "specprobe": info})
                        yield "data: [DONE]\n\n"
                        return
                    elif what == "error":
                        yield "data: " + json.dumps({"error": {"message": value, "type": "invalid_request_error", "param": None, "code": None}}) + "\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        return
            finally:
                cancel.set()  # a client gone mid-stream: the generation stops at its next step

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app
