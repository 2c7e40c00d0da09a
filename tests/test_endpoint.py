"""endpoint.Endpoint keeps one promise for every caller (reward, policy completions, pair writer): each attempt ends
at its deadline (connect + send + headers + body) whatever the server does byte by byte, retries are bounded, and
Ctrl-C ends a run at once. Real servers on 127.0.0.1 that misbehave on purpose, real SIGINT to a real process."""
from contextlib import contextmanager
import json
import os
import signal
import socketserver
import subprocess
import sys
import time

import pytest

from nanoalign.completions import HttpPolicy, PolicyServerError
from nanoalign.endpoint import Endpoint, EndpointError, HttpReward
from tests.fixtures import ROOT, run_script, serving, write_jsonl

BYTE_EVERY = 0.05  # seconds between two bytes of a trickled reply: far within any per-read timeout
REPLY = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "reward:1.5"},
                                 "text": "7", "finish_reason": "stop"}],
                    "usage": {"completion_tokens": 1}}).encode().ljust(300)  # 15 s to trickle, whitespace is JSON


def reply_bytes(mode) -> tuple[bytes, bytes]:
    """(sent at once, trickled) of a valid 200 reply, framed as `mode` says."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    if mode == "headers":  # everything trickled, from the status line on
        return b"", head + b"Content-Length: %d\r\n\r\n" % len(REPLY) + REPLY
    if mode == "body":
        return head + b"Content-Length: %d\r\n\r\n" % len(REPLY), REPLY
    if mode == "close":  # no length: the body ends when the server closes
        return head + b"Connection: close\r\n\r\n", REPLY
    if mode == "chunked":
        return head + b"Transfer-Encoding: chunked\r\n\r\n", b"%x\r\n" % len(REPLY) + REPLY + b"\r\n0\r\n\r\n"
    assert mode == "silent"  # accepts, reads the request, never answers
    return b"", b""


@contextmanager
def misbehaving_server(mode):
    """Yields (base URL, arrival times of the requests). The server stops sending once the client has gone."""
    arrivals = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            length = 0
            while (line := self.rfile.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            self.rfile.read(length)
            arrivals.append(time.monotonic())
            now, later = reply_bytes(mode)
            try:
                self.wfile.write(now)
                for i in range(len(later)):
                    time.sleep(BYTE_EVERY)
                    self.wfile.write(later[i:i + 1])
                self.rfile.read(1)  # silent: wait for the client to hang up
            except OSError:
                return

    with serving(socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)) as url:
        yield url, arrivals


PROMPT = [{"role": "user", "content": "2+2?"}]


@pytest.mark.parametrize("mode", ["headers", "body", "close", "chunked", "silent"])
def test_every_attempt_ends_at_its_deadline(mode):
    """timeout 0.4 s, 1 retry: two attempts of 0.4 s, whatever the server sends (the `close` reply, whose socket
    http.client takes away from its connection, used to be read for as long as the server kept trickling)."""
    with misbehaving_server(mode) as (url, arrivals):
        start = time.monotonic()
        with pytest.raises(EndpointError, match=r"no complete reply within 0.4 s after 2 attempts$"):
            HttpReward(url, timeout=0.4, retries=1, backoff=0.01).score([PROMPT], ["4"])
        took = time.monotonic() - start
    assert len(arrivals) == 2 and arrivals[1] - arrivals[0] >= 0.4
    assert 0.8 <= took < 1.3, f"{mode}: two attempts of 0.4 s took {took:.2f} s"


def test_policy_client_keeps_the_same_deadline():
    with misbehaving_server("close") as (url, arrivals):
        policy = HttpPolicy(url, "m", stop_ids=[0], max_new_tokens=4, timeout=0.4, retries=1, backoff=0.01)
        start = time.monotonic()
        with pytest.raises(PolicyServerError, match=r"no complete reply within 0.4 s after 2 attempts$"):
            policy.sample([([1, 2, 3], ("p0", 0))])
        took = time.monotonic() - start
    assert len(arrivals) == 2 and 0.8 <= took < 1.3, took


def test_pair_writer_keeps_the_same_deadline(tmp_path):
    """gen_pairs_chat.py --timeout 1 against a trickling server: one line after 1 s (it used to hang until the
    trickle ended, 15 s here)."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "q0"}])
    with misbehaving_server("close") as (url, arrivals):
        proc = run_script("gen_pairs_chat.py", "--url", url, "--model", "gpt-test", "--prompts", prompts,
                          "--timeout", 1, "--retries", 0, "--out", tmp_path / "out", check=False, timeout=60)
        ended = time.monotonic()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"error: pair writer {url}/chat/completions: no complete reply "
                                                    f"within 1 s after 1 attempts")
    # the attempt's 1 s, then the exit of a process that imported torch (1.5 s on 2 busy cores)
    assert len(arrivals) == 1 and ended - arrivals[0] < 1 + 3


def test_ctrl_c_ends_a_trickling_reply_at_once(tmp_path):
    """A real process scoring against a server that trickles `Connection: close` replies (timeout 60 s, 4 retries):
    SIGINT ends it within 2 s (it used to read on until every trickle ended)."""
    code = ("from nanoalign.endpoint import HttpReward\n"
            "HttpReward(URL, timeout=60, retries=4, concurrency=2).score([[{'role': 'user', 'content': 'q'}]] * 3,"
            " ['a', 'b', 'c'])\n")
    with misbehaving_server("close") as (url, arrivals):
        proc = subprocess.Popen([sys.executable, "-c", code.replace("URL", repr(url))], cwd=ROOT,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            deadline = time.monotonic() + 30
            while len(arrivals) < 2:
                assert time.monotonic() < deadline and proc.poll() is None, "the requests never arrived"
                time.sleep(0.05)
            time.sleep(0.5)  # both replies are trickling now
            start = time.monotonic()
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=30)
            took = time.monotonic() - start
        finally:
            if proc.poll() is None:
                proc.kill()
    assert took < 2, f"Ctrl-C took {took:.1f} s"
    assert proc.returncode != 0 and "KeyboardInterrupt" in stderr and len(arrivals) == 2


def test_no_item_starts_after_the_first_failure(monkeypatch):
    """map's first error stops the others, and none starts after it: the worker that failed stops the endpoint
    before it takes the next queued item. Before, the main thread stopped it once it woke up, and on a busy machine
    a worker had often sent the next request by then (a reward endpoint asked again after the run gave up, in 4 of
    30 tries); a main thread slow to wake is played here by a `wait` that returns 0.2 s late."""
    import nanoalign.endpoint as endpoint_module
    real_wait = endpoint_module.wait

    def slow_wait(*args, **kw):
        result = real_wait(*args, **kw)
        time.sleep(0.2)
        return result
    monkeypatch.setattr(endpoint_module, "wait", slow_wait)
    endpoint = Endpoint("http://127.0.0.1:9/v1/x", concurrency=1)
    started = []

    def fn(i):
        if i == 0:
            raise EndpointError("down")
        started.append((i, endpoint.stopped.is_set()))  # what post() checks before it sends anything

    with pytest.raises(EndpointError, match="down"):
        endpoint.map(fn, range(3))
    assert started and all(stopped for _, stopped in started), started
