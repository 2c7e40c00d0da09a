"""An OpenAI-compatible HTTP endpoint, asked many items at once: the transport (a total deadline per attempt,
retries with backoff, a concurrency limit, prompt stop on Ctrl-C), a JSONL cache that lets a rerun ask only what
is missing, and on top of both the reward client (NVIDIA NIM reward models: Llama-3.1-Nemotron-70B-Reward).

    ep = Endpoint("https://integrate.api.nvidia.com/v1/chat/completions", what="reward server")
    replies = ep.map(lambda payload: ep.post(payload, parse=json.loads), payloads)   # in order; stops on error
    rm = HttpReward("https://integrate.api.nvidia.com/v1", cache_path="runs/rm_cache.jsonl", tokenizer="tok/")

Errors: EndpointError ends a run (after the retries, or at once for 401/403/404 and the like); ClientError is a
refusal of one item (400, 413, 422: e.g. an input over the model's context) that the caller may record and skip.
"""
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
import fcntl
import hashlib
import http.client
import io
import json
import os
from pathlib import Path
import socket
import ssl
import threading
import time
import urllib.parse

from tokenizers import Tokenizer

from nanoalign.errors import InputError
from nanoalign.jsonl import has_fields, parse_rows, say_damaged
from nanoalign.rundir import disk_errors

NVIDIA_BASE_URL = "https://integrate.api.nvidia.com/v1"
NEMOTRON_REWARD = "nvidia/llama-3.1-nemotron-70b-reward"
ITEM_ERRORS = (400, 413, 422)  # the item is refused (too long, malformed content); the endpoint itself works


class EndpointError(RuntimeError):
    """The endpoint failed for good: after the retries, or at once on a 4xx that is not about one item."""


class ClientError(EndpointError):
    """The endpoint refused one item (HTTP 400/413/422); other items may still succeed."""


class Retry(Exception):
    """A failure worth another attempt: 5xx, 429, timeout, connection error, or a reply `parse` finds unusable."""

    def __init__(self, what, wait=None):
        super().__init__(what)
        self.what, self.wait = what, wait


class Stopped(Exception):
    """Raised in worker threads once the endpoint is stopped (Ctrl-C): no more requests, no more retries."""


class Endpoint:
    """POST JSON to one URL, many requests at a time.

    Each attempt has a total deadline of `timeout` seconds: connect, TLS handshake, send, status line, headers and
    body together. Every socket call of an attempt waits at most the time left to that deadline, so no server keeps
    an attempt alive past it, whatever it does byte by byte (trickled headers or body, `Connection: close` without
    a Content-Length, chunks, accepting and never answering). 5xx, 429, timeouts, connection errors and Retry raised
    by `parse` are retried `retries` times after backoff * 2^k seconds (or the server's Retry-After, at most 60 s).
    The API key is read from the environment variable `api_key_env` at each request; it is never an argument, never
    stored, and scrubbed from every message.

    stop() (called by map on Ctrl-C) aborts the requests in flight and every retry: workers raise Stopped.
    """

    def __init__(self, url, api_key_env="NVIDIA_API_KEY", timeout=60.0, retries=4, backoff=1.0, concurrency=8,
                 what="endpoint"):
        parts = urllib.parse.urlsplit(url)
        if parts.username or parts.password:
            raise InputError(f"credentials in the {what} URL are not supported: put the key in ${api_key_env}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"{what} URL must be http(s)://host/..., got {url!r}")
        self.parts, self.url = parts, url
        self.where = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))  # no query string
        self.target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None
        self.api_key_env, self.what = api_key_env, what
        self.timeout, self.retries, self.backoff, self.concurrency = timeout, retries, backoff, concurrency
        self.stopped = threading.Event()
        self._live, self._lock = set(), threading.Lock()  # sockets in flight, for stop()

    # --- one item

    def post(self, payload: dict, parse=lambda body: body):
        """POST payload with retries; returns parse(reply body). Raises EndpointError / ClientError / Stopped."""
        body = json.dumps(payload).encode()
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return parse(self._request(body, attempt))
            except Retry as e:
                if attempt == attempts:
                    raise EndpointError(self._say(f"{e.what} after {attempts} attempts")) from None
                if self.stopped.wait(e.wait if e.wait is not None else self.backoff * 2 ** (attempt - 1)):
                    raise Stopped() from None
            except ValueError as e:  # parse could not read a reply that arrived whole: not worth retrying
                raise EndpointError(self._say(str(e))) from None

    def _request(self, body: bytes, attempt: int) -> bytes:
        """One POST within the deadline. Raises Retry, Stopped, ClientError or EndpointError."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        deadline = time.monotonic() + self.timeout
        socks = []  # this attempt's sockets: stop() may abort them, the end of the attempt closes them
        try:
            sock = self._connect(deadline, socks)
            # http.client writes the request on our socket and parses the reply, which it reads through _Reply
            cls = http.client.HTTPSConnection if self.tls else http.client.HTTPConnection
            conn = cls(self.parts.hostname, self.parts.port, **({"context": self.tls} if self.tls else {}))
            conn.sock = sock
            sock.settimeout(self._left(deadline))
            conn.request("POST", self.target, body, headers)
            reply = http.client.HTTPResponse(_Reply(sock, lambda: self._left(deadline)), method="POST")
            reply.begin()
            status, data, retry_after = reply.status, reply.read(), reply.getheader("Retry-After", "")
        except TimeoutError:
            raise Retry(f"no complete reply within {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as e:
            if self.stopped.is_set():  # the socket was aborted by stop(): not the server's failure
                raise Stopped() from None
            raise Retry(f"{type(e).__name__}: {e}") from None
        finally:
            with self._lock:
                self._live.difference_update(socks)
            for sock in socks:
                sock.close()
        if status < 300:
            return data
        what = f"HTTP {status}: {data[:300].decode('utf-8', 'replace')!r}"
        if status == 429 or status >= 500:
            raise Retry(what, min(float(retry_after), 60.0) if retry_after.isdigit() else None)
        hint = f" (is ${self.api_key_env} set?)" if status in (401, 403) else ""
        error = ClientError if status in ITEM_ERRORS else EndpointError
        raise error(self._say(f"{what}{hint} (attempt {attempt}, not retried)"))

    def _connect(self, deadline, socks) -> socket.socket:
        """A socket connected to the server (TLS for https) within the deadline, each one made added to `socks` and
        to the sockets stop() aborts before it is used. Addresses are tried in turn, as socket.create_connection
        does (the DNS lookup itself is not under the deadline)."""
        host, port = self.parts.hostname, self.parts.port or (443 if self.tls else 80)
        error = OSError(f"no address for {host}")
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            sock = self._track(socket.socket(family, kind, proto), socks)
            try:
                sock.settimeout(self._left(deadline))
                sock.connect(address)
            except TimeoutError:
                raise
            except OSError as e:  # refused, unreachable: the next address
                error = e
                continue
            if self.tls:
                sock = self._track(self.tls.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False),
                                   socks)
                sock.settimeout(self._left(deadline))
                sock.do_handshake()
            return sock
        raise error

    def _track(self, sock, socks):
        with self._lock:
            self._live.add(sock)
        socks.append(sock)
        return sock

    def _left(self, deadline) -> float:
        """Seconds to the deadline, the most the next socket call may wait. Raises Stopped once stop() was called
        (after the sockets were aborted: a call that starts now must not wait either), TimeoutError past it."""
        if self.stopped.is_set():
            raise Stopped()
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError()
        return left

    def _say(self, message: str) -> str:
        """'<what> <url>: message' with the API key scrubbed."""
        message = f"{self.what} {self.where}: {message}"
        key = os.environ.get(self.api_key_env)
        return message.replace(key, "***") if key else message

    # --- many items

    def map(self, fn, items) -> list:
        """[fn(item) for item in items], `concurrency` at a time, in order.

        The first error raised by fn (e.g. EndpointError) stops the others (queued items dropped, requests in
        flight aborted) and is raised. Ctrl-C does the same at once, then raises KeyboardInterrupt: what fn
        stored before (e.g. a cache row) stays stored.
        """
        items = list(items)
        if not items:
            return []

        def run(item):
            try:
                return fn(item)
            except BaseException:
                self.stop()  # here, before this worker takes the next queued item: none starts after a failure
                raise

        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        futures = [pool.submit(run, item) for item in items]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() is not None for f in done):
                self.stop()
                pool.shutdown(wait=True, cancel_futures=True)  # the others end at once, most of them in Stopped
                errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
                raise next((e for e in errors if not isinstance(e, Stopped)), errors[0])  # the failure itself
            return [f.result() for f in futures]
        except BaseException:
            self.stop()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.stopped.clear()

    def stop(self):
        """Abort every request in flight and every retry wait; new requests raise Stopped until map returns."""
        self.stopped.set()
        with self._lock:
            live = list(self._live)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in connect, send or recv on it at once
            except OSError:
                pass


class _Reply(io.RawIOBase):
    """The bytes of a reply as http.client.HTTPResponse reads them (its `sock`): each recv waits at most the time
    left to the attempt's deadline, and none starts past it or after stop(). (A timer that shuts the connection's
    socket is not enough: once the headers of a `Connection: close` reply are read, http.client hands the socket
    to the response and sets conn.sock to None, so the body was read for as long as the server kept trickling.)"""

    def __init__(self, sock, left):
        self.sock, self.left = sock, left  # left(): seconds to the deadline; raises past it or once stopped

    def makefile(self, mode):
        return io.BufferedReader(self)

    def readable(self):
        return True

    def readinto(self, buffer):
        self.sock.settimeout(self.left())
        return self.sock.recv_into(buffer)


class JsonlCache:
    """Rows keyed by some of their fields, appended to a JSONL file as they arrive and read back at start.

    Only rows whose `scope` fields match (e.g. the model name) are read, so one file can hold several models'
    answers. A row is a result (holding `fields` as has_fields checks them: what a fresh reply gives) or a refusal
    (an `error` string). Several processes may share the file (the ranks of a torchrun job): each read and append
    holds an flock on it. On open, a line torn by a kill and damaged rows (not JSON, a key field missing, neither a
    result nor a refusal) are cut from the file, the damage named in one line: their items are asked again.
    """

    def __init__(self, path, key_fields: tuple, scope: dict, fields: dict | None = None):
        self.path = Path(path) if path else None
        self.key_fields, self.scope = key_fields, scope
        self.rows: dict[tuple, dict] = {}
        self._lock = threading.Lock()
        self._is_result = has_fields(fields)
        self._has_keys = has_fields(dict.fromkeys(key_fields, (str, int)))
        if self.path and self.path.exists():
            with disk_errors(self.path), _locked(self.path, "rb+") as f:
                data = f.read()
                rows, lines, damaged = parse_rows(data, self._check)
                kept = b"".join(lines)
                if kept != data:  # in place, under the lock: other processes append after what is kept
                    f.seek(0)
                    f.write(kept)
                    f.truncate()
            say_damaged(self.path, damaged, "their items are asked again")
            for row in rows:
                if self._in_scope(row):
                    self.rows[tuple(row[k] for k in key_fields)] = row

    def _in_scope(self, row):
        return all(row.get(k) == v for k, v in self.scope.items())

    def _check(self, row):
        """What is wrong with a row of this cache, or None (a row of another scope is left as it is)."""
        if not isinstance(row, dict):
            return f"a JSON {type(row).__name__}, not an object"
        if not self._in_scope(row):
            return None  # another model's row: kept as it is
        return self._has_keys(row) or (None if isinstance(row.get("error"), str) else self._is_result(row))

    def get(self, key: tuple) -> dict | None:
        return self.rows.get(key)

    def put(self, key: tuple, **values):
        """Store {**scope, key fields, **values}: in memory, and as one appended line on disk."""
        row = {**self.scope, **dict(zip(self.key_fields, key)), **values}
        with self._lock:
            self.rows[key] = row
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with disk_errors(self.path), _locked(self.path, "ab") as f:
                    f.write((json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))


@contextmanager
def _locked(path, mode):
    """The file opened in `mode` with an exclusive flock, released when it is closed (after the last write)."""
    with open(path, mode) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield f


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_tokenizer(path_or_hub_id) -> Tokenizer:
    """A tokenizers.Tokenizer from a tokenizer.json, a dir holding one, or a hub id (its tokenizer.json)."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:
            raise InputError(f"{path}: not a tokenizers tokenizer.json ({e})") from None
    from nanoalign.model import is_hub_id
    if not is_hub_id(path_or_hub_id):
        raise FileNotFoundError(f"tokenizer not found: {path_or_hub_id} (a tokenizer.json, a dir holding one, "
                                f"or a hub id)")
    from huggingface_hub import hf_hub_download
    try:
        return Tokenizer.from_file(hf_hub_download(str(path_or_hub_id), "tokenizer.json"))
    except Exception as e:  # offline, gated, no such repo: one line
        raise FileNotFoundError(f"{path_or_hub_id}: tokenizer.json not available from the hub "
                                f"({type(e).__name__})") from None


# -----------------------------------------------------------------------------
# The reward client

MAX_ABS_SCORE = 1e6  # the one bound on a reward score, for every backend and for cached scores


def is_score(value) -> bool:
    """Whether `value` is a usable reward score: a number with |value| <= MAX_ABS_SCORE.

    Reward models score within about ±100 (Skywork-Reward-V2 about ±40, Nemotron-70B-Reward about -40..10). NaN
    and inf are no scores, and neither is a finite 1e308: its differences and means overflow (1e308 - -1e308 is
    inf), so a win rate or a mean reward built from it is inf or NaN. Beyond 1e6 something is broken (weights, a
    head overflowing, a server bug); within it sums of 10^300 scores stay finite and a difference of two scores
    keeps its sign and about 10 significant digits in float64.
    """
    return type(value) in (int, float) and abs(value) <= MAX_ABS_SCORE


def is_score_or_none(value) -> bool:
    """is_score, or None: the score of an item the endpoint refused (samples.jsonl, per_prompt.jsonl)."""
    return value is None or is_score(value)

def parse_reward(body: bytes) -> float:
    """The score in a chat-completions reply of a NIM reward model.

    Nemotron-70B-Reward puts it in `choices[0].logprobs.content` as the logprob of the token "reward"; some servers
    only write the message content "reward:<float>" (multi-attribute models write "a:1.0,b:2.0"). First form
    first, then the second.

    Raises:
        ValueError: neither form, with an excerpt of the body.
        Retry: a score that is_score refuses (NaN, inf, beyond ±MAX_ABS_SCORE): never a result, asked again.
    """
    try:
        choice = json.loads(body)["choices"][0]
        found = [entry["logprob"] for entry in (choice.get("logprobs") or {}).get("content") or []
                 if entry.get("token") == "reward"]
        if not found:
            content = (choice.get("message") or {}).get("content") or ""
            found = [dict(p.split(":", 1) for p in content.replace(" ", "").split(",") if ":" in p)["reward"]]
        score = float(found[0])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        excerpt = body[:300].decode("utf-8", "replace")
        raise ValueError(f"no reward in the reply (neither logprobs token 'reward' nor content 'reward:<float>'): "
                         f"{excerpt!r}") from None
    if not is_score(score):
        raise Retry(f"unusable score {score} in the reply (NaN, inf or beyond ±{MAX_ABS_SCORE:g})")
    return score


class HttpReward:
    """Scores from an OpenAI-compatible `POST {base_url}/chat/completions` reward endpoint (see Endpoint for the
    deadline, retries, concurrency and Ctrl-C).

    Each item is sent as messages = prompt + [{"role": "assistant", "content": response}] and parsed by
    parse_reward. Items are cut to the endpoint's context (max_tokens, 4,096 for Nemotron-70B-Reward): the
    response keeps its beginning (at most 3/4 of the budget), the prompt its end (earliest messages go first).
    Lengths are counted with `tokenizer` (a tokenizer.json, its dir or a hub id, a tokenizers.Tokenizer or a Chat)
    when given; `reserve` tokens (default 96) are left for the endpoint's template. Without one, a conservative
    bound is used: 1 token per 3 ASCII characters plus 1 per UTF-8 byte of any other character (CJK text: 3 per
    character), which cuts more than needed: pass the endpoint model's tokenizer to keep more.

    Scores are appended to the JSONL `cache_path` as they arrive, keyed by (prompt id, sha256 of the response)
    for this `model`, and read back at start, so a restarted run asks only what is missing; a cached score gets the
    checks a fresh one gets (is_score), and one that fails them (a NaN left by a killed older run, a hand edit) is
    a damaged row: dropped on open and asked again. An item the endpoint refuses (ClientError) is cached as
    {"error": ...}: its score is None, it is counted in `skipped`, and a rerun does not ask it again. If the first
    `refusals_before_stop` items of a run are all refused, the endpoint is refusing everything (a wrong model name,
    say) and the run stops with that error.
    """

    def __init__(self, base_url=NVIDIA_BASE_URL, model=NEMOTRON_REWARD, api_key_env="NVIDIA_API_KEY", timeout=60,
                 retries=4, backoff=1.0, concurrency=8, max_tokens=4096, cache_path=None, tokenizer=None,
                 reserve=96, refusals_before_stop=16):
        self.endpoint = Endpoint(base_url.rstrip("/") + "/chat/completions", api_key_env, timeout, retries,
                                 backoff, concurrency, what="reward server")
        self.url, self.where = self.endpoint.url, self.endpoint.where
        self.model, self.max_tokens, self.reserve = model, max_tokens, reserve
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a Chat's tokenizers.Tokenizer
        self.cache = JsonlCache(cache_path, ("id", "response_sha256"), {"model": model}, {"score": is_score})
        self.cache_hits = 0
        self.skipped: dict[tuple, str] = {}  # key -> the endpoint's refusal, this run and cached ones
        self.refusals_before_stop, self._answered, self._refused = refusals_before_stop, 0, 0

    def score(self, prompts, responses, ids=None) -> list[float | None]:
        """Scores in order; None for an item the endpoint refused (see `skipped`). Raises EndpointError (after
        the retries) for the first item that fails; every score received before that is already cached."""
        assert len(prompts) == len(responses), f"{len(prompts)} prompts but {len(responses)} responses"
        assert ids is None or len(ids) == len(prompts), f"{len(ids)} ids for {len(prompts)} prompts"
        keys = [(ids[i] if ids is not None else sha256(json.dumps(p, sort_keys=True)), sha256(r))
                for i, (p, r) in enumerate(zip(prompts, responses))]
        todo = {}
        for key, p, r in zip(keys, prompts, responses):
            if self.cache.get(key) is not None:  # a usable score (the cache checked it on open) or a refusal
                self.cache_hits += 1
            else:
                todo.setdefault(key, (p, r))
        self.endpoint.map(self._score_one, todo.items())
        out = []
        for key in keys:
            row = self.cache.get(key)
            if "error" in row:
                self.skipped[key] = row["error"]
            out.append(row.get("score"))
        return out

    def _score_one(self, item):
        key, (prompt, response) = item
        payload = {"model": self.model, "messages": self.truncate(prompt, response)}
        try:
            score = self.endpoint.post(payload, parse_reward)
        except ClientError as e:
            self._refused += 1
            if not self._answered and self._refused >= self.refusals_before_stop:
                raise EndpointError(f"the first {self._refused} items were all refused: {e}") from None
            self.cache.put(key, error=str(e))
            return
        self._answered += 1
        self.cache.put(key, score=score)

    # --- truncation

    def truncate(self, prompt: list[dict], response: str) -> list[dict]:
        """prompt + [assistant response] within max_tokens - reserve: the response's beginning (at most 3/4 of the
        budget), then as much of the prompt's end as fits (earlier messages dropped, the oldest kept one cut from
        its left; a leading assistant turn left alone is dropped too)."""
        budget = self.max_tokens - self.reserve
        response = self._cut(response, budget * 3 // 4, keep="head")
        left = budget - self._length(response)
        kept = []
        for m in reversed(prompt):
            n = self._length(m["content"])
            if n <= left:
                kept.append(m)
                left -= n
                continue
            if left > 0:
                kept.append({**m, "content": self._cut(m["content"], left, keep="tail")})
            break
        kept.reverse()
        while len(kept) > 1 and kept[0]["role"] == "assistant":
            kept.pop(0)
        return kept + [{"role": "assistant", "content": response}]

    def _costs(self, text: str) -> list[int]:
        """Tokens each character may cost without a tokenizer (an upper bound for byte-level BPE beyond ASCII)."""
        return [1 if ord(c) < 128 else len(c.encode("utf-8")) * 3 for c in text]  # in thirds of a token

    def _length(self, text: str) -> int:
        if self.tokenizer is None:
            return -(-sum(self._costs(text)) // 3)
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _cut(self, text: str, n: int, keep: str) -> str:
        """The first (keep="head") or last ("tail") part of text that is at most n tokens long."""
        if self._length(text) <= n:
            return text
        if self.tokenizer is not None:
            offsets = self.tokenizer.encode(text, add_special_tokens=False).offsets
            cut = text[:offsets[n][0]] if keep == "head" else text[offsets[-n][0]:]
            while self._length(cut) > n:  # a character split over several tokens (byte-level BPE) went whole
                cut = cut[:-1] if keep == "head" else cut[1:]
            return cut
        costs, total, i = self._costs(text), 0, 0
        order = range(len(text)) if keep == "head" else range(len(text) - 1, -1, -1)
        for i in order:
            if total + costs[i] > 3 * n:
                break
            total += costs[i]
        return text[:i] if keep == "head" else text[i + 1:]
