"""`specprobe serve`: an OpenAI-compatible HTTP server on the speculative engine (FastAPI + uvicorn).

    POST /v1/chat/completions   POST /v1/completions     (stream or not; max_tokens, temperature,
                                                           top_p, top_k, seed, stop, stream)
    GET  /v1/models             GET  /health             GET  /metrics (Prometheus text)

One model in memory serves every client: up to `max_batch` generations side by side, one
speculative step each per target forward (engine/batch.py: continuous batching; on llama.cpp the
rows of all of them share one decode), the others waiting in arrival order; requests beyond
`max_queue` (running + waiting) get 429 with Retry-After. Each generation
owns its KV cache and drops it when it ends. Responses carry the usual `usage` plus a `specprobe`
field with the decoding statistics (method, tau, target forwards), which OpenAI clients ignore.

What a client can make the server do is bounded (`Limits`):
- work: a request's generation stops at its deadline (`request_timeout`, counted from its
  arrival, queueing included) and when its client disconnects, streaming or not; `max_tokens`
  above `max_tokens_cap` is refused; a body over `max_body` bytes gets 413 before it is parsed;
  parsing, the chat template and tokenizing run on a worker thread, never on the event loop.
- access: with an API key every /v1 request needs `Authorization: Bearer KEY` (401 otherwise);
  a POST must be `application/json` (415), so a cross-site form post from a browser is refused.
- input: every bad request is a 400 with OpenAI's error object naming the field, unsupported
  OpenAI fields included; never a 500 for any input (a 500 would be a bug).
"""


import asyncio
import hmac
import json
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .engine.batch import Batcher
from .errors import SpecProbeError

ROLES = ("system", "user", "assistant")
DEFAULT_MAX_TOKENS = 128
SEED_RANGE = 2**63  # seeds in [0, 2**63): what every generator the engine uses takes
# OpenAI fields accepted and ignored (they change nothing a client could rely on)
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# OpenAI fields accepted only at the value that means "off"
NEUTRAL_FIELDS = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "echo": False, "best_of": 1, "n": 1, "logit_bias": {}, "suffix": None}
HONOURED = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options"}


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class Cancelled(Exception):
    """The client went away before its generation started or while it ran."""


@dataclass(frozen=True)
class Limits:
    """What one request may cost the server (see the module docstring)."""

    request_timeout: float = 300.0  # seconds from a request's arrival to the end of its generation
    max_tokens_cap: int = 2048  # the largest max_tokens accepted
    max_body: int = 1_000_000  # bytes of a request body
    api_key: str | None = None  # None: no authentication (the server then binds to loopback only)


@dataclass
class Params:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool = True  # stream_options.include_usage (specprobe sends usage either way unless told not to)
    deadline: float = math.inf  # time.monotonic() by which the generation ends


@dataclass
class Metrics:
    ok: int = 0
    errors: int = 0
    rejected: int = 0
    cancelled: int = 0
    timed_out: int = 0
    tokens: int = 0
    forwards: int = 0
    generation_seconds: float = 0.0
    queued: int = 0  # running + waiting
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def prometheus(self) -> str:
        tau = self.tokens / self.forwards if self.forwards else 0.0
        tps = self.tokens / self.generation_seconds if self.generation_seconds else 0.0
        outcomes = [("ok", self.ok), ("error", self.errors), ("rejected", self.rejected), ("cancelled", self.cancelled), ("timed_out", self.timed_out)]
        rows = [
            ("specprobe_requests_total", "counter", "requests by outcome", [(f'status="{s}"', n) for s, n in outcomes]),
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
    """Token ids in, text deltas out: holds back a possible prefix of a stop string and any
    characters not yet whole (a byte-fallback tokenizer spells one character over up to four byte
    tokens, which decode to U+FFFD until the last arrives), and reports the first stop string.
    What it sends is always a prefix of the text the whole reply decodes to."""

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
            whole = len(text.rstrip("\ufffd"))  # a character split across tokens: wait for the rest
            ready = min(len(text) - hold, whole)
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
    limits: Limits = field(default_factory=Limits)
    metrics: Metrics = field(default_factory=Metrics)
    max_batch: int = 1  # generations stepped side by side (engine/batch.py); the rest wait in the queue
    # every generation runs on the batcher's one thread, which owns the model (and no per-request
    # thread allocates for it, whose allocations would scatter over new malloc arenas)
    batcher: Batcher | None = None
    # a request's thread waits here for its generation (one per queued request; they only wait)
    executor: ThreadPoolExecutor | None = None
    # requests are parsed, templated and tokenized here, off the event loop
    parser: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="specprobe-parse"))

    def __post_init__(self):
        from .api import target_of

        if self.batcher is None:
            self.batcher = Batcher(target_of(self.lm.model), self.max_batch)
        if self.executor is None:
            self.executor = ThreadPoolExecutor(self.max_queue, thread_name_prefix="specprobe-request")

    def admit(self) -> None:
        with self.metrics.lock:
            if self.metrics.queued >= self.max_queue:
                self.metrics.rejected += 1
                raise RequestError(429, f"the server is busy ({self.max_queue} requests running or waiting); retry shortly", code="rate_limit_exceeded")
            self.metrics.queued += 1

    def release(self) -> None:
        self.metrics.add(queued=-1)

    def generate(self, p: Params, on_delta, cancel: threading.Event):
        """Runs in a worker thread. Returns (text, finish_reason, stats); raises Cancelled when the
        client went away. A stop string, a cancel or the deadline ends the generation through the
        loop's own stop (the token callback returns True), so the drafter's `finish` runs and the
        statistics count what was generated."""
        from .api import new_generation

        assembler = TextAssembler(self.lm.tokenizer, p.stop)
        ended = {"deadline": False}

        def on_tokens(ids: list[int]) -> bool:
            if cancel.is_set():
                return True
            delta = assembler.add(ids)
            if delta:
                on_delta(delta)
            if time.monotonic() > p.deadline:
                ended["deadline"] = True
                return True
            return assembler.stopped

        def start():  # on the batcher's thread, when the request's turn comes
            if cancel.is_set():
                raise Cancelled()
            if time.monotonic() > p.deadline:
                self.metrics.add(timed_out=1)
                raise RequestError(408, f"the request waited past its deadline of {self.limits.request_timeout:g} s", code="timeout")
            return new_generation(
                self.lm.model, self.lm.tokenizer, p.prompt_ids, method=self.method, max_new_tokens=p.max_tokens,
                on_tokens=on_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed, **self.options,
            )

        _, stats, stop_reason = self.batcher.submit(start).result()
        elapsed = stats.wall_time
        _release_freed_memory()
        if cancel.is_set() and not assembler.stopped:
            raise Cancelled()
        reason = "stop" if stop_reason == "eos" or assembler.stopped else "length"
        tail = assembler.rest() if not assembler.stopped else ""
        if tail:
            on_delta(tail)
        n_tokens = len(assembler.ids)
        self.metrics.add(tokens=n_tokens, forwards=stats.target_forwards, generation_seconds=elapsed, timed_out=int(ended["deadline"]))
        info = {
            "method": self.method,
            "completion_tokens": n_tokens,
            "target_forwards": stats.target_forwards,
            "tau": stats.tau,
            "tokens_per_s": n_tokens / elapsed if elapsed > 0 else None,
            "stopped_at_deadline": ended["deadline"],
        }
        return assembler.text, reason, info


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc). The KV cache no longer grows by reallocation
    (kv_cache.PositionCache), but each request still allocates its cache's buffers, drafters'
    caches and activations of its own sizes, which glibc's adaptive mmap threshold puts on the
    heap; without a trim the resident size still creeps up (README, "The KV cache")."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


# -- request parsing -------------------------------------------------------------------------------
def _reject_constant(name: str):
    raise RequestError(400, f"the body holds {name}, which is not a number JSON allows")


def load_json(raw: bytes):
    """The body as JSON; NaN and Infinity (which Python's json would take) are errors."""
    try:
        return json.loads(raw.decode("utf-8") if raw else "null", parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"malformed JSON: {e}") from None
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply") from None


def _number(body: dict, key: str, default, low=None, high=None, integer=False):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RequestError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(400, f"'{key}' must be a finite number, got {value!r}", key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(400, f"'{key}' must be in [{low}, {high}], got {value!r}", key)
    return value


def _text(value, where: str) -> str:
    """A string that encodes as UTF-8 (JSON allows lone surrogates such as "\\ud800"; UTF-8 does not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, f"{where} holds characters that are not valid Unicode (a lone surrogate)", where.split("[")[0]) from None
    return value


def _check_fields(body: dict, chat: bool) -> None:
    for key, value in body.items():
        if key in HONOURED or key in IGNORED_FIELDS:
            continue
        if key in NEUTRAL_FIELDS and value in (None, NEUTRAL_FIELDS[key]):
            continue
        raise RequestError(400, f"unsupported parameter '{key}'" + (f" = {value!r}" if key in NEUTRAL_FIELDS else "") + " (specprobe serve does not implement it)", key, "unsupported_parameter")
    if ("messages" if not chat else "prompt") in body:
        raise RequestError(400, f"'{'messages' if not chat else 'prompt'}' belongs to the other endpoint", "messages" if not chat else "prompt")


def parse_request(body, served: Served, chat: bool, arrived: float | None = None) -> Params:
    from .models import format_prompt

    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    _check_fields(body, chat)
    model = body.get("model")
    if model is not None and model != served.name:
        raise RequestError(404, f"the model '{model}' does not exist; this server serves '{served.name}'", "model", "model_not_found")
    tokenizer = served.lm.tokenizer
    try:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise RequestError(400, "'messages' must be a non-empty list", "messages")
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in ROLES:
                    raise RequestError(400, f"messages[{i}]: 'role' must be one of {', '.join(ROLES)}", "messages")
                if not isinstance(m.get("content"), str):
                    raise RequestError(400, f"messages[{i}]: 'content' must be a string", "messages")
                _text(m["content"], f"messages[{i}].content")
            ids = format_prompt(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages])
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise RequestError(400, "'prompt' must be a non-empty string", "prompt")
            ids = format_prompt(tokenizer, _text(prompt, "prompt"), chat=False)
    except (RequestError, SpecProbeError):
        raise
    except Exception as e:  # noqa: BLE001 - a chat template or tokenizer refusing this input is the input's fault
        raise RequestError(400, f"cannot format this prompt: {type(e).__name__}: {str(e)[:200]}", "messages" if chat else "prompt") from None
    context = served_context(served)
    cap = served.limits.max_tokens_cap
    max_tokens = _number(body, "max_tokens", min(DEFAULT_MAX_TOKENS, cap), 1, cap, integer=True)
    if body.get("max_completion_tokens") is not None:
        max_tokens = _number(body, "max_completion_tokens", max_tokens, 1, cap, integer=True)
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
    for s in stop:
        _text(s, "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(options.get("include_usage", True), bool)):
        raise RequestError(400, "'stream_options' takes only include_usage (a boolean)", "stream_options")
    arrived = time.monotonic() if arrived is None else arrived
    return Params(
        ids,
        max_tokens,
        float(_number(body, "temperature", 0.0, 0.0, 2.0)),
        float(_number(body, "top_p", 1.0, 1e-9, 1.0)),
        int(_number(body, "top_k", 0, 0, None, integer=True)),
        _number(body, "seed", None, 0, SEED_RANGE - 1, integer=True),
        stop,
        stream,
        include_usage=bool((options or {}).get("include_usage", True)),
        deadline=arrived + served.limits.request_timeout,
    )


def served_context(served: Served) -> int:
    from .api import target_of

    return target_of(served.lm.model).max_length


# -- the app ---------------------------------------------------------------------------------------
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error", 408: "timeout_error",
               413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error"}


def error_body(e: RequestError) -> dict:
    return {"error": {"message": e.message, "type": ERROR_TYPES.get(e.status, "server_error"), "param": e.param, "code": e.code}}


def create_app(served: Served):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="specprobe", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    limits = served.limits

    def error(e: RequestError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 429 else ({"WWW-Authenticate": "Bearer"} if e.status == 401 else None)
        return JSONResponse(error_body(e), e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # unknown paths, wrong methods: OpenAI's error shape too
        return error(RequestError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error(RequestError(400, "invalid request"))

    @app.exception_handler(Exception)
    async def any_error(request, exc):  # a bug: never a traceback to the client; the server keeps serving
        served.metrics.add(errors=1)
        return error(RequestError(500, f"internal error: {type(exc).__name__}"))

    def refusal(method: str, path: str, headers: dict[str, str]) -> RequestError | None:
        """Why a /v1 request is refused before its body is read (None: it may go on)."""
        if not path.startswith("/v1/"):
            return None
        if limits.api_key is not None:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {limits.api_key}".encode()):
                return RequestError(401, "a valid API key is needed: send Authorization: Bearer <key>", code="invalid_api_key")
        if method == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return RequestError(415, f"the body must be application/json, got {kind or 'no content type'!r}", code="unsupported_media_type")
            size = headers.get("content-length")
            if size is not None and (not size.isdigit() or int(size) > limits.max_body):
                return RequestError(413, f"the body is larger than {limits.max_body} bytes", code="request_too_large")
        return None

    class Guard:
        """Access control as plain ASGI middleware (Starlette's BaseHTTPMiddleware would hide a
        client's disconnect from the endpoint, which must see it to stop the generation)."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
                refused = refusal(scope["method"], scope["path"], headers)
                if refused is not None:
                    served.metrics.add(errors=1)
                    await error(refused)(scope, receive, send)
                    return
            await self.inner(scope, receive, send)

    app.add_middleware(Guard)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "method": served.method, "queued": served.metrics.queued,
                "running": served.batcher.active, "max_batch": served.max_batch}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0, "owned_by": "specprobe"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(served.metrics.prometheus(), media_type="text/plain; version=0.0.4")

    async def read_body(request: Request) -> bytes:
        """The body, refused (413) as soon as it grows past the limit (a chunked body has no length)."""
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limits.max_body:
                raise RequestError(413, f"the body is larger than {limits.max_body} bytes", code="request_too_large")
            parts.append(part)
        return b"".join(parts)

    async def until_done_or_gone(future, request: Request, cancel: threading.Event):
        """Await the generation; a client that disconnects cancels it at its next step."""
        wrapped = asyncio.wrap_future(future)
        while True:
            done, _ = await asyncio.wait({wrapped}, timeout=0.25)
            if done:
                return wrapped.result()
            if await request.is_disconnected():
                cancel.set()

    async def complete(request: Request, chat: bool):
        arrived = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            raw = await read_body(request)
            params = await loop.run_in_executor(served.parser, lambda: parse_request(load_json(raw), served, chat, arrived))
            served.admit()
        except RequestError as e:
            if e.status != 429:
                served.metrics.add(errors=1)
            return error(e)
        except SpecProbeError as e:
            served.metrics.add(errors=1)
            return error(RequestError(400, str(e)))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        base = {"id": rid, "created": int(time.time()), "model": served.name}
        cancel = threading.Event()
        usage = lambda info: {"prompt_tokens": len(params.prompt_ids), "completion_tokens": info["completion_tokens"], "total_tokens": len(params.prompt_ids) + info["completion_tokens"]}

        if not params.stream:
            try:
                text, reason, info = await until_done_or_gone(served.executor.submit(served.generate, params, lambda d: None, cancel), request, cancel)
            except Cancelled:
                served.metrics.add(cancelled=1)
                return error(RequestError(499, "the client closed the request"))
            except RequestError as e:
                return error(e)
            except SpecProbeError as e:
                served.metrics.add(errors=1)
                return error(RequestError(400, str(e)))
            finally:
                served.release()
            served.metrics.add(ok=1)
            choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text, "logprobs": None}
            choice["finish_reason"] = reason
            kind = "chat.completion" if chat else "text_completion"
            return JSONResponse({**base, "object": kind, "choices": [choice], "usage": usage(info), "specprobe": info})

        queue: asyncio.Queue = asyncio.Queue()
        kind = "chat.completion.chunk" if chat else "text_completion"

        def on_delta(delta: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("delta", delta))

        def work():
            try:
                result = served.generate(params, on_delta, cancel)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", result))
            except Cancelled:
                served.metrics.add(cancelled=1)
                loop.call_soon_threadsafe(queue.put_nowait, ("cancelled", None))
            except RequestError as e:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", error_body(e)))
            except Exception as e:  # noqa: BLE001 - reported to the client as an error chunk
                served.metrics.add(errors=1)
                status = 400 if isinstance(e, SpecProbeError) else 500
                loop.call_soon_threadsafe(queue.put_nowait, ("error", error_body(RequestError(status, str(e) if status == 400 else f"internal error: {type(e).__name__}"))))
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
                        served.metrics.add(ok=1)
                        extra = {"usage": usage(info), "specprobe": info} if params.include_usage else {"specprobe": info}
                        yield chunk(None, reason, extra)
                        yield "data: [DONE]\n\n"
                        return
                    elif what == "error":
                        yield "data: " + json.dumps(value) + "\n\n"
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
