"""A soak benchmark for `specprobe serve` (issue 28): many clients for a bounded time.

Starts `specprobe serve` on loopback with an API key, then drives it with `--clients` concurrent
`openai` clients (default 16) for `--minutes` (default 10). Each client loops over a weighted mix
of requests:

  chat-stream / chat / completion   good requests; latency to the first token is recorded
  bad-json, nan-temperature, unknown-field, big-seed, lone-surrogate   -> 400 expected
  wrong-key, no-key                 -> 401 expected
  text-plain                        -> 415 expected
  too-big                           -> 413 expected
  hang-up-stream, hang-up-request   the client disconnects mid-generation

Every outcome other than the expected one for its kind is an *unintended error* (must be 0). The
server's resident memory (RSS) is sampled every minute; after the first minute it must stay within
10 % of that minute's value. The report goes to stdout and, with `--out`, to a JSON file.

    python scripts/soak.py --minutes 10 --out runs/soak.json

This is a benchmark, not a test: it takes minutes and its figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import openai

KEY = "soak-key"
PROMPTS = [
    "Write a haiku about the sea.",
    "List three prime numbers and say why they are prime.",
    "Explain what a hash table is in two sentences.",
    "Translate 'good morning, how are you?' into French.",
    "Write a Python function that reverses a string.",
    "你好！请用一句话介绍你自己。 🙂",
]
# kind -> (weight, expected outcome)
MIX = {
    "chat-stream": (6, "ok"),
    "chat": (3, "ok"),
    "completion": (2, "ok"),
    "bad-json": (1, 400),
    "nan-temperature": (1, 400),
    "unknown-field": (1, 400),
    "big-seed": (1, 400),
    "lone-surrogate": (1, 400),
    "wrong-key": (1, 401),
    "no-key": (1, 401),
    "text-plain": (1, 415),
    "too-big": (1, 413),
    "hang-up-stream": (1, "gone"),
    "hang-up-request": (1, "gone"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Soak:
    def __init__(self, base: str, model: str, max_tokens: int, deadline: float, seed: int):
        self.base, self.model, self.max_tokens, self.deadline = base, model, max_tokens, deadline
        self.seed = seed
        self.lock = threading.Lock()
        self.outcomes: Counter = Counter()  # (kind, outcome) -> n
        self.unintended: list[str] = []
        self.first_token_s: list[float] = []  # streaming requests: request sent -> first text
        self.reply_s: list[float] = []  # non-streaming requests: request sent -> whole reply

    def record(self, kind: str, outcome, detail: str = "") -> None:
        expected = MIX[kind][1]
        with self.lock:
            self.outcomes[(kind, str(outcome))] += 1
            if outcome != expected:
                self.unintended.append(f"{kind}: got {outcome} {detail}"[:300])

    def raw(self, body: bytes, headers: dict, path: str = "/v1/chat/completions") -> int:
        with httpx.Client(timeout=600) as c:
            return c.post(self.base + path, content=body, headers=headers).status_code

    def one(self, rng: random.Random, client: openai.OpenAI) -> None:
        kinds = list(MIX)
        kind = rng.choices(kinds, weights=[MIX[k][0] for k in kinds])[0]
        prompt = rng.choice(PROMPTS)
        messages = [{"role": "user", "content": prompt}]
        auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        good = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens}
        try:
            if kind == "chat-stream":
                t0 = time.perf_counter()
                first, text = None, ""
                for chunk in client.chat.completions.create(model=self.model, messages=messages, max_tokens=self.max_tokens, stream=True):
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.perf_counter() - t0
                        text += chunk.choices[0].delta.content
                if first is not None:
                    with self.lock:
                        self.first_token_s.append(first)
                self.record(kind, "ok" if text else "empty")
            elif kind == "chat":
                t0 = time.perf_counter()
                r = client.chat.completions.create(model=self.model, messages=messages, max_tokens=self.max_tokens)
                with self.lock:
                    self.reply_s.append(time.perf_counter() - t0)
                self.record(kind, "ok" if r.choices[0].message.content else "empty")
            elif kind == "completion":
                r = client.completions.create(model=self.model, prompt=prompt, max_tokens=self.max_tokens, temperature=0.7, seed=rng.randrange(1000))
                self.record(kind, "ok" if r.choices[0].text is not None else "empty")
            elif kind == "bad-json":
                self.record(kind, self.raw(b'{"model": "x", "messages": [', auth))
            elif kind == "nan-temperature":
                self.record(kind, self.raw(json.dumps({**good, "temperature": float("nan")}).encode(), auth))
            elif kind == "unknown-field":
                self.record(kind, self.raw(json.dumps({**good, "tools": [{"type": "function"}]}).encode(), auth))
            elif kind == "big-seed":
                self.record(kind, self.raw(json.dumps({**good, "temperature": 1.0, "seed": 2**64}).encode(), auth))
            elif kind == "lone-surrogate":
                self.record(kind, self.raw(b'{"messages": [{"role": "user", "content": "\\ud800"}]}', auth))
            elif kind == "wrong-key":
                self.record(kind, self.raw(json.dumps(good).encode(), {**auth, "Authorization": "Bearer nope"}))
            elif kind == "no-key":
                self.record(kind, self.raw(json.dumps(good).encode(), {"Content-Type": "application/json"}))
            elif kind == "text-plain":
                self.record(kind, self.raw(json.dumps(good).encode(), {**auth, "Content-Type": "text/plain"}))
            elif kind == "too-big":
                self.record(kind, self.raw(b'{"x": "' + b"a" * 2_000_000 + b'"}', auth))
            elif kind == "hang-up-stream":
                stream = client.chat.completions.create(model=self.model, messages=messages, max_tokens=self.max_tokens, stream=True)
                for _chunk in stream:
                    break  # the first chunk, then hang up
                stream.close()
                self.record(kind, "gone")
            elif kind == "hang-up-request":
                try:  # give up long before the reply can come
                    client.with_options(timeout=0.3).chat.completions.create(model=self.model, messages=messages, max_tokens=self.max_tokens)
                    self.record(kind, "gone")  # answered within 0.3 s: nothing to hang up on
                except openai.APITimeoutError:
                    self.record(kind, "gone")
        except openai.APIStatusError as e:
            self.record(kind, e.status_code, str(e))
        except Exception as e:  # noqa: BLE001 - every other failure is an unintended error
            self.record(kind, type(e).__name__, str(e))

    def client_loop(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        client = openai.OpenAI(base_url=self.base + "/v1", api_key=KEY, max_retries=0, timeout=600)
        while time.monotonic() < self.deadline:
            self.one(rng, client)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="hybrid")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-batch", type=int, default=None, help="the server's --max-batch (default: its own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "specprobe", "serve", "--model", args.model, "--method", args.method, "--backend", args.backend,
           "--port", str(port), "--api-key", KEY, "--max-queue", str(4 * args.clients), "--request-timeout", "300"]
    if args.max_batch is not None:
        cmd += ["--max-batch", str(args.max_batch)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t_start = time.monotonic()
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                print(server.stdout.read(), file=sys.stderr)
                raise SystemExit("soak: the server did not start")
            if time.monotonic() - t_start > 600:
                raise SystemExit("soak: the server did not answer /health within 10 minutes")
            time.sleep(1)
        print(f"soak: server up in {time.monotonic() - t_start:.0f} s; {args.clients} clients for {args.minutes:g} min", flush=True)

        deadline = time.monotonic() + 60 * args.minutes
        soak = Soak(base, args.model, args.max_tokens, deadline, args.seed)
        threads = [threading.Thread(target=soak.client_loop, args=(i,), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        rss = [rss_mib(server.pid)]
        t0 = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(min(60, max(0.0, deadline - time.monotonic())))
            rss.append(rss_mib(server.pid))
            done = sum(soak.outcomes.values())
            print(f"soak: {(time.monotonic() - t0) / 60:.1f} min, {done} requests, RSS {rss[-1]:.0f} MiB, unintended {len(soak.unintended)}", flush=True)
        for t in threads:
            t.join(timeout=900)
        alive = httpx.get(base + "/health", timeout=5).status_code == 200
        metrics = {}  # Prometheus text: "name{labels} value" lines
        for line in httpx.get(base + "/metrics", timeout=5).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                metrics[name] = float(value)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    after_first = rss[1] if len(rss) > 1 else rss[0]
    drift = max(abs(r - after_first) / after_first for r in rss[1:]) if len(rss) > 1 else 0.0
    by_outcome = Counter()
    for (kind, outcome), n in soak.outcomes.items():
        by_outcome[f"{kind} -> {outcome}"] += n
    report = {
        "minutes": args.minutes, "clients": args.clients, "model": args.model, "method": args.method, "backend": args.backend,
        "max_tokens": args.max_tokens, "max_batch": args.max_batch, "cpu": os.cpu_count(),
        "requests": sum(soak.outcomes.values()),
        "outcomes": dict(sorted(by_outcome.items())),
        "first_token_s": {"n": len(soak.first_token_s), "p50": percentile(soak.first_token_s, 0.5), "p99": percentile(soak.first_token_s, 0.99)},
        "non_stream_reply_s": {"n": len(soak.reply_s), "p50": percentile(soak.reply_s, 0.5), "p99": percentile(soak.reply_s, 0.99)},
        "aggregate_tokens_per_s": round(metrics.get("specprobe_generated_tokens_total", 0.0) / (60 * args.minutes), 2),
        "answered_429": sum(n for (kind, outcome), n in soak.outcomes.items() if outcome == "429"),
        "unintended_errors": len(soak.unintended),
        "unintended_examples": soak.unintended[:10],
        "rss_mib_per_minute": [round(r, 1) for r in rss],
        "rss_max_drift_after_first_minute": round(drift, 4),
        "server_alive_after": alive,
        "server_metrics": metrics,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    ok = report["unintended_errors"] == 0 and drift <= 0.10 and alive
    print("soak: " + ("PASS" if ok else "FAIL") + f" (unintended errors {len(soak.unintended)}, RSS drift {100 * drift:.1f} %, alive {alive})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
