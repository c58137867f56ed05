"""Reliability and security of `serve` and the CLI: bounded work, authentication, clean errors for
every bad input (a table for the CLI and one for HTTP, random bodies thrown at both endpoints),
disconnects on both paths, streamed text equal to the whole reply for a byte-fallback tokenizer,
and state files that survive a SIGKILL mid-write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import _start

from specprobe.commands import main as cli
from specprobe.server import Limits, Served

NAME = "smollm2-135m"
KEY = "sk-test-key"


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specprobe", *args], input=stdin, capture_output=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})  # one thread, as the workers: their kernel plans apply


def one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    err = proc.stderr.decode(errors="replace")
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("specprobe: converting")]
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    assert lines[-1].startswith("specprobe: error:") and needle in lines[-1], lines


# -- the CLI ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corrupt")
    (folder / "cache.json").write_text("{not json")
    (folder / "state.pt").write_bytes(b"\x00 not a torch file")
    return folder


CLI_CASES = [
    (["generate", "--temperature", "nan", "hi"], None, "temperature"),
    (["generate", "--temperature", "1", "--seed", str(2**64), "hi"], None, "seed"),
    (["generate", "--device", "bogus", "hi"], None, "device"),
    (["generate", "--dtype", "int8", "hi"], None, "dtype"),
    (["generate", "-"], b"\xff\xfe not utf-8", "UTF-8"),
    (["generate", "--method", "esp", "--branching", "100000000", "--max-new-tokens", "2", "hi"], None, "branching"),
    (["generate", "--method", "omnidraft-frozen", "--draft-model", NAME, "--ngram-cache", "{corrupt}/cache.json", "--max-new-tokens", "2", "hi"], None, "n-gram cache"),
    (["generate", "--method", "omnidraft", "--draft-model", NAME, "--adapt-state", "{corrupt}/state.pt", "--max-new-tokens", "2", "hi"], None, "adapt state"),
    (["serve", "--host", "0.0.0.0"], None, "--api-key"),
    (["bench", "--repeats", "0", "--out", "/tmp/unused-specprobe"], None, "--repeats"),
    (["generate", "--model", "/nonexistent/model.gguf", "hi"], None, "no such GGUF file"),
]


@pytest.mark.parametrize("argv, stdin, needle", CLI_CASES, ids=[c[2] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_and_exit_2(argv, stdin, needle, corrupt):
    one_line_error(run_cli(*[a.replace("{corrupt}", str(corrupt)) for a in argv], stdin=stdin), needle)


def test_cli_internal_error_is_one_line_naming_the_report(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("SPECPROBE_CACHE", str(tmp_path))

    def broken(args):
        raise RuntimeError("an engine bug")

    monkeypatch.setattr("specprobe.commands.generate.run_command", broken)
    assert cli.main(["generate", "hi"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "internal error (RuntimeError)" in err[0]
    report = err[0].split(" in ")[1].split(" (")[0]
    assert "an engine bug" in open(report).read()
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "generate", "hi"])


# -- the server ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(smollm2):
    """A server with an API key, small limits and plain decoding (fast answers)."""
    served = Served(smollm2, NAME, "ar", {}, max_queue=4, limits=Limits(request_timeout=60, max_tokens_cap=64, max_body=20_000, api_key=KEY))
    srv, thread, url = _start(served)
    yield served, url
    srv.should_exit = True
    thread.join(timeout=10)


def post(url: str, body: bytes | str | dict, key: str | None = KEY, kind: str = "application/json", path: str = "/v1/chat/completions") -> httpx.Response:
    headers = {"content-type": kind}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    content = json.dumps(body) if isinstance(body, dict) else body
    return httpx.post(url + path, content=content, headers=headers, timeout=120)


MESSAGES = '"messages": [{"role": "user", "content": "Hi"}]'
HTTP_CASES = [
    ("nan", '{' + MESSAGES + ', "temperature": NaN}', 400, "invalid_request_error"),
    ("infinity", '{' + MESSAGES + ', "top_p": Infinity}', 400, "invalid_request_error"),
    ("seed", '{' + MESSAGES + ', "seed": 18446744073709551616}', 400, "invalid_request_error"),
    ("negative seed", '{' + MESSAGES + ', "seed": -1}', 400, "invalid_request_error"),
    ("surrogate", '{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "invalid_request_error"),
    ("logprobs", '{' + MESSAGES + ', "logprobs": true}', 400, "invalid_request_error"),
    ("tools", '{' + MESSAGES + ', "tools": [{"type": "function"}]}', 400, "invalid_request_error"),
    ("penalty", '{' + MESSAGES + ', "presence_penalty": 0.5}', 400, "invalid_request_error"),
    ("cap", '{' + MESSAGES + ', "max_tokens": 65}', 400, "invalid_request_error"),
    ("prompt on chat", '{' + MESSAGES + ', "prompt": "x"}', 400, "invalid_request_error"),
    ("deep", "[" * 100000 + "]" * 100000, 413, "invalid_request_error"),
    ("nested", "[" * 5000 + "]" * 5000, 400, "invalid_request_error"),
]


@pytest.mark.parametrize("case, body, status, kind", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_bad_http_input_is_a_clean_error(guarded, case, body, status, kind):
    r = post(guarded[1], body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == kind and err["message"] and "Traceback" not in r.text
    named = {"logprobs": "logprobs", "tools": "tools", "penalty": "presence_penalty", "seed": "seed", "cap": "max_tokens"}
    if case in named:
        assert err["param"] == named[case]  # names the field


def test_honoured_fields_and_neutral_values_are_accepted(guarded):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "top_k": 5, "temperature": 0.5, "seed": 1,
            "presence_penalty": 0, "logprobs": False, "n": 1, "user": "someone", "stream_options": {"include_usage": True}}
    assert post(guarded[1], body).status_code == 200


def test_access_control(guarded):
    url = guarded[1]
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for key in (None, "sk-wrong"):
        r = post(url, body, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = post(url, json.dumps(body), kind="text/plain")  # what a cross-site form post sends
    assert r.status_code == 415
    assert httpx.get(url + "/health").status_code == 200  # no key needed outside /v1
    right = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert right.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2).choices[0].message.content is not None
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)


def test_a_body_too_large_is_refused_before_parsing(guarded):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 30_000}]})
    assert post(guarded[1], big).status_code == 413
    chunked = httpx.post(guarded[1] + "/v1/completions", content=iter([big.encode()]),  # no content-length: read up to the limit
                         headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"}, timeout=60)
    assert chunked.status_code == 413


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELDS = st.sampled_from(["messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "model", "n", "logprobs"])
BODIES = st.dictionaries(FIELDS, JSON, max_size=6) | st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]), "content": st.text(max_size=30)}), max_size=3)},
    optional={"max_tokens": st.integers(-2, 70), "temperature": st.floats(-1, 3, allow_nan=False), "stop": JSON, "stream": st.booleans()})


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_random_json_bodies_never_give_a_500(guarded, body, path):
    r = post(guarded[1], body, path=path)
    assert r.status_code < 500, r.text


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200), path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_random_bytes_never_give_a_500(guarded, raw, path):
    r = post(guarded[1], raw, path=path)
    assert r.status_code < 500, r.text
    assert httpx.get(guarded[1] + "/health", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def open_server(smollm2):
    served = Served(smollm2, NAME, "ar", {}, max_queue=4, limits=Limits(request_timeout=60, max_tokens_cap=400))
    srv, thread, url = _start(served)
    yield served, url
    srv.should_exit = True
    thread.join(timeout=10)


def wait_idle(served, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while served.metrics.queued and time.time() < deadline:
        time.sleep(0.05)
    assert served.metrics.queued == 0


def test_a_non_streaming_client_that_hangs_up_stops_its_generation(open_server):
    served, url = open_server
    before_tokens, before_cancelled = served.metrics.tokens, served.metrics.cancelled
    body = {"messages": [{"role": "user", "content": "Write a very long story about the sea."}], "max_tokens": 400}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=1.0)
    wait_idle(served)
    assert served.metrics.cancelled == before_cancelled + 1
    assert served.metrics.tokens - before_tokens < 400  # stopped at its next step, not at max_tokens


def test_the_deadline_ends_a_generation(smollm2):
    served = Served(smollm2, NAME, "ar", {}, limits=Limits(request_timeout=1.0, max_tokens_cap=4000))
    srv, thread, url = _start(served)
    try:
        body = {"messages": [{"role": "user", "content": "Write a very long story about the sea."}], "max_tokens": 3000}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["specprobe"]["stopped_at_deadline"]
        assert r.json()["usage"]["completion_tokens"] < 3000
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def test_health_answers_while_a_generation_runs(open_server):
    served, url = open_server
    body = {"messages": [{"role": "user", "content": "Write a long story about a lighthouse."}], "max_tokens": 200}
    worker = threading.Thread(target=lambda: httpx.post(url + "/v1/chat/completions", json=body, timeout=120))
    worker.start()
    time.sleep(0.5)
    assert served.metrics.queued == 1
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        times.append(time.perf_counter() - t0)
    worker.join()
    assert min(times) < 0.1, times  # the event loop is never the one generating


def test_streamed_text_equals_the_reply_for_a_byte_fallback_tokenizer(gemma3):
    """Gemma3's tokenizer spells characters it has no token for as UTF-8 byte tokens: an emoji or
    a rare CJK character arrives over several steps, each an incomplete character on its own."""
    served = Served(gemma3, "gemma3-270m", "ar", {})
    srv, thread, url = _start(served)
    try:
        prompt = "Repeat exactly: 🦒🪼 龘 𠜎 ok 🦒🪼 龘 𠜎"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        kwargs = dict(model="gemma3-270m", prompt=prompt, max_tokens=24)
        whole = client.completions.create(**kwargs).choices[0].text
        parts = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs)]
        assert "".join(parts) == whole
        # U+FFFD only where max_tokens cut the reply inside a character's bytes (as in the non-streamed reply)
        assert "\ufffd" not in whole.rstrip("\ufffd")
        assert any(ch in whole for ch in "🦒🪼龘𠜎")  # the characters did come through
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


# -- state on disk ---------------------------------------------------------------------------------
WRITER = """
import sys
from specprobe.drafters.omnidraft.vocab_bridge import NGramCache
cache = NGramCache(max_entries=200_000)
for i in range(150_000):
    cache.add((i, i + 1), i)
n = 0
while True:
    cache.add((n, n + 2), n)
    cache.save(sys.argv[1])
    n += 1
"""


def test_state_survives_a_sigkill_mid_write(tmp_path):
    from specprobe.drafters.omnidraft.vocab_bridge import NGramCache

    path = tmp_path / "ngram.json"
    for delay in (0.0, 0.3, 0.7):  # after the writer's first whole write: SIGKILL lands mid-write
        before = path.stat().st_mtime_ns if path.exists() else None
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
        deadline = time.monotonic() + 300  # a loaded machine imports slowly; no timing is asserted
        while (not path.exists() or path.stat().st_mtime_ns == before) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # until this writer has replaced the file once
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert path.exists()
        assert len(NGramCache.load(path, max_entries=200_000)) >= 150_000  # the old file or the new one, never half of one
