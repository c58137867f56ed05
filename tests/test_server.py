"""`specprobe serve`: the OpenAI-compatible server, driven by the official `openai` client.

The server runs in a thread on a free loopback port with the session's SmolLM2 (greedy, so its
text must equal `specprobe.generate`'s). Bad input gets its status and an error object, and the
next good request still succeeds. A bounded load test: 16 concurrent streaming clients, 80
requests, no error but deliberate 429s, memory flat.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

import specprobe
from specprobe.server import Served, create_app

NAME = "smollm2-135m"
PROMPT = "Name three primary colours."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(served: Served):
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(served), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(smollm2):
    served = Served(smollm2, NAME, "esp", {}, max_queue=4)
    srv, thread, url = _start(served)
    yield served, url
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_stream_equals_non_stream_equals_generate(server, client, smollm2):
    kwargs = dict(model=NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    ref = specprobe.generate(smollm2.model, smollm2.tokenizer, [{"role": "user", "content": PROMPT}], method="esp", max_new_tokens=24)
    assert whole.choices[0].message.content == "".join(parts) == ref.text
    assert whole.usage.completion_tokens == ref.stats.new_tokens
    assert whole.usage.prompt_tokens == len(ref.prompt_ids)
    extra = whole.model_extra["specprobe"]
    # (forwards may differ between runs: --budget auto sizes trees from timings; the text may not)
    assert extra["method"] == "esp" and 1 <= extra["target_forwards"] <= whole.usage.completion_tokens


def test_completion_stream_and_not(client, smollm2):
    kwargs = dict(model=NAME, prompt="The capital of France is", max_tokens=12)
    whole = client.completions.create(**kwargs)
    parts = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs)]
    ref = specprobe.generate(smollm2.model, smollm2.tokenizer, "The capital of France is", method="esp", max_new_tokens=12, chat=False)
    assert whole.choices[0].text == "".join(parts) == ref.text
    assert whole.choices[0].finish_reason in ("length", "stop")


def test_stop_string(client, smollm2):
    ref = specprobe.generate(smollm2.model, smollm2.tokenizer, [{"role": "user", "content": PROMPT}], method="esp", max_new_tokens=24).text
    stop = ref.split()[2]  # a word from the middle of the greedy answer
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=24, stop=[stop])
    assert out.choices[0].message.content == ref[: ref.find(stop)]
    assert out.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=24, stop=[stop], stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == ref[: ref.find(stop)]


def test_sampling_with_seed_repeats(client):
    kwargs = dict(model=NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=1.0, seed=3)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


BAD = [
    ({"model": NAME, "messages": []}, 400),
    ({"model": NAME}, 400),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400),
    ({"model": NAME, "messages": [{"role": "user", "content": "word " * 9000}]}, 400),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404),
]


@pytest.mark.parametrize("body, status", BAD, ids=["empty", "missing", "role", "max0", "maxbig", "temperature", "long", "model"])
def test_bad_input_is_an_error_object_and_the_server_goes_on(server, client, body, status):
    r = httpx.post(server[1] + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert "Traceback" not in r.text
    ok = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_malformed_json(server):
    r = httpx.post(server[1] + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]


def test_models_health_metrics(server):
    url = server[1]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == [NAME]
    text = httpx.get(url + "/metrics").text
    for name in ("specprobe_requests_total", "specprobe_generated_tokens_total", "specprobe_target_forwards_total", "specprobe_tau", "specprobe_tokens_per_second", "specprobe_queue_length"):
        assert f"# TYPE {name}" in text


def test_client_disconnect_frees_its_place(server):
    served, url = server
    body = {"model": NAME, "messages": [{"role": "user", "content": "Write a long story about a dragon."}], "max_tokens": 200, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line and '""' not in line:
                break  # the first real token: hang up
    deadline = time.time() + 30
    while served.metrics.queued and time.time() < deadline:
        time.sleep(0.1)
    assert served.metrics.queued == 0
    assert served.metrics.cancelled >= 1


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_load_16_streaming_clients_80_requests(smollm2):
    served = Served(smollm2, NAME, "esp", {}, max_queue=8)
    srv, thread, url = _start(served)
    statuses, first_token, lock = [], [], threading.Lock()
    http = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=16))  # one client, reused by all threads

    def one(i: int) -> None:
        body = {"model": NAME, "messages": [{"role": "user", "content": f"Say a number near {i}."}], "max_tokens": 3, "stream": True}
        deadline = time.time() + 600
        while time.time() < deadline:
            t0 = time.perf_counter()
            with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code == 429:
                    assert r.headers.get("retry-after")
                    with lock:
                        statuses.append(429)
                    time.sleep(0.5)
                    continue
                lines = []
                for line in r.iter_lines():
                    if line.startswith("data:") and "content" in line and len(lines) == 1:
                        with lock:
                            first_token.append(time.perf_counter() - t0)
                    if line.startswith("data:"):
                        lines.append(line)
                assert lines[-1] == "data: [DONE]", lines[-3:]
                assert all("error" not in json.loads(x[5:]) for x in lines[:-1])
                with lock:
                    statuses.append(r.status_code)
                return
        raise AssertionError("never admitted")

    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, range(20)))
            rss_after_20 = _rss_kb()
            t0 = time.perf_counter()
            list(pool.map(one, range(20, 80)))
            elapsed = time.perf_counter() - t0
        rss_end = _rss_kb()
    finally:
        http.close()
        srv.should_exit = True
        thread.join(timeout=10)
    assert statuses.count(200) == 80
    assert set(statuses) <= {200, 429}
    assert rss_end <= 1.10 * rss_after_20, (rss_after_20, rss_end)
    first_token.sort()
    print(f"\nload: 60 requests in {elapsed:.1f} s = {60 / elapsed:.2f} req/s; 429s {statuses.count(429)}; "
          f"time to first token p50 {first_token[len(first_token) // 2]:.2f} s, p95 {first_token[int(0.95 * len(first_token))]:.2f} s; "
          f"{served.metrics.tokens / served.metrics.generation_seconds:.1f} tok/s in generation; RSS {rss_after_20 // 1024} -> {rss_end // 1024} MB")
