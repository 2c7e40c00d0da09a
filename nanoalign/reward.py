"""Reward backends behind one batched interface: a rule (the toy task), a local HF reward model, an HTTP endpoint.

Every backend has `score(prompts, responses, ids=None) -> list[float]`: prompts[i] is the conversation before
responses[i] (a list of {"role", "content"} messages), ids[i] a stable id of that prompt (used for caching).

    rm = load_reward("toy")                                     # nanoalign.toy.reward, offline
    rm = load_reward("Skywork/Skywork-Reward-V2-Qwen3-0.6B", device="cuda", dtype=torch.bfloat16)
    rm = load_reward("http", cache_path="runs/rm_cache.jsonl")  # NVIDIA Nemotron-70B-reward; key in $NVIDIA_API_KEY
    scores = rm.score([[{"role": "user", "content": "2+2?"}]], ["4"], ids=["q0"])
"""
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
import hashlib
import http.client
import inspect
import json
import os
from pathlib import Path
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import torch
import torch.nn as nn

from nanoalign import toy
from nanoalign.errors import InputError
from nanoalign.chat import IM_END, IM_START, QWEN_SYSTEM, load_chat
from nanoalign.model import Decoder, ModelConfig, load_weights, read_safetensors_dir, resolve_model_dir

DEFAULT_REWARD_MODEL = "Skywork/Skywork-Reward-V2-Qwen3-0.6B"
NVIDIA_BASE_URL = "https://integrate.api.nvidia.com/v1"
NEMOTRON_REWARD = "nvidia/llama-3.1-nemotron-70b-reward"
SEQ_CLS_ARCHITECTURES = ("Qwen2ForSequenceClassification", "Qwen3ForSequenceClassification")


def load_reward(spec: str, **kw):
    """"toy" -> RuleReward; "http" -> HttpReward on NVIDIA's API; "http(s)://..." -> HttpReward on that base URL;
    anything else -> LocalRewardModel (a local dir or a hub id).

    Keyword arguments go to the backend that takes them (a script can pass device=, batch_size=, model=,
    cache_path= whatever the spec); one that no backend takes is a TypeError.
    """
    backends = (RuleReward, LocalRewardModel, HttpReward)
    unknown = set(kw) - {name for b in backends for name in inspect.signature(b).parameters}
    if unknown:
        raise TypeError(f"load_reward: unknown argument(s) {sorted(unknown)}")
    cls, args = _backend(spec)
    taken = inspect.signature(cls).parameters
    return cls(*args, **{k: v for k, v in kw.items() if k in taken})


def _backend(spec: str):
    """The backend class of `spec` and its positional arguments."""
    if spec == "toy":
        return RuleReward, ()
    if spec == "http" or spec.startswith(("http://", "https://")):
        return HttpReward, (NVIDIA_BASE_URL if spec == "http" else spec,)
    return LocalRewardModel, (spec,)


def prompt_check(spec: str):
    """What the backend of `spec` needs from a prompt, without loading it: a function(messages) that raises
    InputError for a prompt whose answers it cannot score, or None (it scores any prompt). Scripts run it on every
    prompt before sampling, so an ungradable prompt fails at once instead of after a sampled batch."""
    return getattr(_backend(spec)[0], "check_prompt", None)


def _check_batch(prompts, responses, ids):
    assert len(prompts) == len(responses), f"{len(prompts)} prompts but {len(responses)} responses"
    assert ids is None or len(ids) == len(prompts), f"{len(ids)} ids for {len(prompts)} prompts"


class RuleReward:
    """The built-in offline task's rule (nanoalign.toy.reward): 1.0 exact answer, 0.5, 0.1 or 0.0."""

    check_prompt = staticmethod(toy.check_prompt)

    def score(self, prompts, responses, ids=None) -> list[float]:
        _check_batch(prompts, responses, ids)
        return [float(toy.reward(p, r)) for p, r in zip(prompts, responses)]


# -----------------------------------------------------------------------------
# A local sequence-classification reward model: our Decoder + the checkpoint's linear `score` head

def format_qwen3(messages: list[dict]) -> str:
    """Qwen3's chat template (tokenizer_config.json of Qwen/Qwen3-*), no-tools branch, add_generation_prompt=False.

    No default system prompt. Assistant turns after the last user turn get a think block when they are the last
    message or carry reasoning: `<think>\\n{reasoning}\\n</think>\\n\\n{content}`, so a plain final answer is written
    as `<think>\\n\\n</think>\\n\\n{answer}`. Reasoning is whatever precedes `</think>` in the content (it is dropped
    from earlier turns), and the content's leading newlines are stripped, as the template does.
    """
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    last_query = users[-1] if users else len(messages) - 1
    out = []
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role != "assistant":
            out.append(f"{IM_START}{role}\n{content}{IM_END}\n")
            continue
        reasoning = ""
        if "</think>" in content:
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
        if i > last_query and (i == len(messages) - 1 or reasoning):
            content = f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{content.lstrip(chr(10))}"
        out.append(f"{IM_START}assistant\n{content}{IM_END}\n")
    return "".join(out)


def read_chat_template(model_dir) -> str | None:
    """The chat template of an HF dir: tokenizer_config.json["chat_template"], else chat_template.jinja."""
    model_dir = Path(model_dir)
    config = model_dir / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template:
            return template
    jinja = model_dir / "chat_template.jinja"
    return jinja.read_text() if jinja.exists() else None


def template_style(template: str | None, model_type: str) -> tuple[str, str | None]:
    """("qwen3" | "chatml", default system prompt) for a Qwen-family chat template, without running jinja.

    A template that mentions "<think>" is Qwen3's (think block on the final assistant turn, no default system).
    Otherwise it is ChatML as in Qwen2/2.5, whose default system prompt is the constant string the template writes
    after `<|im_start|>system\\n` (Qwen2.5: "You are Qwen, created by Alibaba Cloud. ...", Qwen2: "You are a
    helpful assistant."); none found -> no system prompt inserted. No template -> decided by model_type.

    Raises:
        ValueError: a template that is not ChatML (no <|im_start|>): we would format it wrong.
    """
    if template is None:
        print(f"reward model: no chat template found, formatting as {model_type} does by default")
        return ("qwen3", None) if model_type == "qwen3" else ("chatml", QWEN_SYSTEM)
    if IM_START not in template:
        raise InputError("reward model chat template is not ChatML (no <|im_start|>): only Qwen2/2.5/3 formats "
                         "are supported")
    if "<think>" in template:
        return "qwen3", None
    m = re.search(r"<\|im_start\|>system\\n([^'\"{}<]+)<\|im_end\|>", template)
    return "chatml", m.group(1) if m else None


class SequenceClassifier(nn.Module):
    """HF *ForSequenceClassification: state_dict keys "model.*" and "score.weight" [num_labels, d], no bias."""

    def __init__(self, config: ModelConfig, num_labels: int):
        super().__init__()
        self.model = Decoder(config)
        self.score = nn.Linear(config.hidden_size, num_labels, bias=False)

    def forward(self, input_ids, attention_mask, last):  # last: [b] index of each row's last real token
        hidden = self.model(input_ids, attention_mask=attention_mask)    # [b, t, d]
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [b, d]
        return self.score(pooled)                                        # [b, num_labels]


class LocalRewardModel:
    """An HF Qwen2/Qwen3 sequence-classification reward model (e.g. Skywork-Reward-V2-Qwen3) run by our Decoder.

    The conversation (prompt + the response as the final assistant turn) is rendered with the model's own chat
    template (see template_style / format_qwen3) and tokenised whole, as `tokenizer(apply_chat_template(conv,
    tokenize=False))` does in the model cards. The score is the head's output at each row's last real token,
    located from the row lengths (never from ids != pad: pad may equal eos, PITFALLS #10). Rows longer than
    max_len keep their last max_len tokens: the prompt is cut from the left, the response kept.

    Args:
        path_or_hub_id: a local dir or a hub id (config.json, safetensors, tokenizer.json, tokenizer_config.json).
        device, dtype: where and in what precision to run.
        batch_size: rows per forward; rows are sorted by length first, which does not change scores.
        max_len: tokens per row.
        padding_side: "right" (default) or "left"; scores do not depend on it.
    """

    def __init__(self, path_or_hub_id=DEFAULT_REWARD_MODEL, device="cpu", dtype=torch.float32, batch_size=8,
                 max_len=4096, padding_side="right"):
        assert padding_side in ("left", "right"), f"padding_side must be 'left' or 'right', got {padding_side!r}"
        model_dir = resolve_model_dir(path_or_hub_id)
        d = json.loads((model_dir / "config.json").read_text())
        arch = (d.get("architectures") or [None])[0]
        if arch not in SEQ_CLS_ARCHITECTURES:
            raise InputError(f"{model_dir}: architecture {arch!r} is not a reward model "
                             f"(expected one of {SEQ_CLS_ARCHITECTURES})")
        self.config = ModelConfig.from_hf(d, source=str(model_dir / "config.json"))
        tensors = read_safetensors_dir(model_dir)
        tensors.pop("lm_head.weight", None)
        if "score.weight" not in tensors:
            raise InputError(f"{model_dir}: no 'score.weight' tensor (not a sequence-classification checkpoint?)")
        num_labels = tensors["score.weight"].shape[0]
        if num_labels != 1:
            raise InputError(f"{model_dir}: score head has {num_labels} labels; a scalar reward model has 1")
        with torch.device("meta"):
            self.model = SequenceClassifier(self.config, num_labels)
        load_weights(self.model, tensors, model_dir, dtype, device)
        self.model.eval()

        template = read_chat_template(model_dir)  # a hub snapshot brings chat_template.jinja along (*.jinja)
        self.style, self.default_system = template_style(template, self.config.model_type)
        self.chat = load_chat(model_dir, default_system=self.default_system)
        self.device, self.batch_size, self.max_len, self.padding_side = device, batch_size, max_len, padding_side
        self.truncated = 0  # rows cut to max_len so far

    def format(self, prompt: list[dict], response: str) -> str:
        """The model's chat template on prompt + [assistant response]: apply_chat_template(tokenize=False)."""
        messages = prompt + [{"role": "assistant", "content": response}]
        if self.style == "qwen3":
            self.chat._turns(messages)  # validation only: roles and string contents
            return format_qwen3(messages)
        return self.chat.format(messages)

    def encode(self, prompt: list[dict], response: str) -> list[int]:
        """Token ids of format(prompt, response), the last max_len of them."""
        ids = self.chat.tokenizer.encode(self.format(prompt, response)).ids
        if len(ids) > self.max_len:
            self.truncated += 1
            ids = ids[-self.max_len:]
        return ids

    def score(self, prompts, responses, ids=None) -> list[float]:
        _check_batch(prompts, responses, ids)
        return self.score_ids([self.encode(p, r) for p, r in zip(prompts, responses)])

    @torch.inference_mode()
    def score_ids(self, seqs: list[list[int]]) -> list[float]:
        """Scores of already tokenised rows, batched by length; the order of `seqs` is kept."""
        assert all(len(s) > 0 for s in seqs), "empty row"
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = [0.0] * len(seqs)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            ids, mask, last = self._pad([seqs[i] for i in rows])
            # right padding needs no mask: under causal attention no real token sees the pads after it, and an
            # unmasked batch takes SDPA's fused causal path
            scores = self.model(ids, mask if self.padding_side == "left" else None, last)[:, 0].float().tolist()
            for i, s in zip(rows, scores):
                out[i] = s
        return out

    def _pad(self, seqs):
        """input_ids, attention_mask [b, t] and the index of each row's last real token [b]."""
        t = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), t), self.chat.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.long)
        lengths = torch.tensor([len(s) for s in seqs])
        for row, s in enumerate(seqs):
            cols = slice(0, len(s)) if self.padding_side == "right" else slice(t - len(s), t)
            ids[row, cols] = torch.tensor(s)
            mask[row, cols] = 1
        last = lengths - 1 if self.padding_side == "right" else torch.full_like(lengths, t - 1)
        return ids.to(self.device), mask.to(self.device), last.to(self.device)


# -----------------------------------------------------------------------------
# An OpenAI-compatible reward endpoint (NVIDIA NIM: Llama-3.1-Nemotron-70B-Reward)

class RewardServerError(RuntimeError):
    """The reward endpoint failed for good (after retries, or at once on a 4xx other than 429)."""


class _Retryable(Exception):
    def __init__(self, what, wait=None):
        super().__init__(what)
        self.what, self.wait = what, wait


def parse_reward(body: bytes) -> float:
    """The score in a chat-completions reply of a NIM reward model.

    Nemotron-70B-Reward puts it in `choices[0].logprobs.content` as the logprob of the token "reward"; some servers
    only write the message content "reward:<float>" (multi-attribute models write "a:1.0,b:2.0"). First form
    first, then the second.

    Raises:
        ValueError: neither form, with an excerpt of the body.
    """
    try:
        choice = json.loads(body)["choices"][0]
        for entry in (choice.get("logprobs") or {}).get("content") or []:
            if entry.get("token") == "reward":
                return float(entry["logprob"])
        content = (choice.get("message") or {}).get("content") or ""
        pairs = dict(p.split(":", 1) for p in content.replace(" ", "").split(",") if ":" in p)
        return float(pairs["reward"])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        excerpt = body[:300].decode("utf-8", "replace")
        raise ValueError(f"no reward in the reply (neither logprobs token 'reward' nor content 'reward:<float>'): "
                         f"{excerpt!r}") from None


class HttpReward:
    """Scores from an OpenAI-compatible `POST {base_url}/chat/completions` reward endpoint.

    Each item is sent as messages = prompt + [{"role": "assistant", "content": response}] and parsed by
    parse_reward. Items are cut to the endpoint's context (max_tokens, 4,096 for Nemotron-70B-Reward): the
    response is kept (up to 3/4 of the budget, its beginning), the prompt keeps its end (earliest messages go
    first). Lengths are counted with `tokenizer` (a tokenizers.Tokenizer or a Chat) when given: that is not the
    endpoint's own Llama-3.1 tokenizer, so `reserve` tokens (default 96) are left for its template and the
    difference. Without a tokenizer a budget of 3 characters per token is used: safe for English prose (~4
    chars/token), not for languages or text that tokenise denser (CJK, digits) -- pass a tokenizer there.

    Requests run `concurrency` at a time; 5xx, 429, timeouts and connection errors are retried `retries` times
    with exponential backoff (backoff * 2^k seconds, or the server's Retry-After), other 4xx fail at once. Scores
    are appended to the JSONL `cache_path` as they arrive, keyed by (prompt id, sha256 of the response) for this
    `model`, and read back at start, so a restarted run asks only what is missing. The API key is read from the
    environment variable `api_key_env` at each request; it is never an argument, never stored on the object,
    and scrubbed from every error message.
    """

    def __init__(self, base_url=NVIDIA_BASE_URL, model=NEMOTRON_REWARD, api_key_env="NVIDIA_API_KEY", timeout=60,
                 retries=4, backoff=1.0, concurrency=8, max_tokens=4096, cache_path=None, tokenizer=None,
                 reserve=96):
        parts = urllib.parse.urlsplit(base_url)
        if parts.username or parts.password:
            raise InputError(f"credentials in the reward URL are not supported: put the key in ${api_key_env}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.where = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") +
                                              "/chat/completions", "", ""))  # for messages: no query string
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.retries, self.backoff, self.concurrency = timeout, retries, backoff, concurrency
        self.max_tokens, self.reserve = max_tokens, reserve
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a Chat's tokenizers.Tokenizer
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache: dict[tuple[str, str], float] = {}
        self.cache_hits = 0
        self._lock = threading.Lock()
        if self.cache_path and self.cache_path.exists():
            self._load_cache()

    # --- cache

    def _load_cache(self):
        for line in self.cache_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash mid-write
                continue
            if row.get("model") == self.model:
                self.cache[(row["id"], row["response_sha256"])] = float(row["score"])

    def _store(self, key, score):
        with self._lock:
            self.cache[key] = score
            if self.cache_path:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.cache_path, "a") as f:
                    f.write(json.dumps({"model": self.model, "id": key[0], "response_sha256": key[1],
                                        "score": score}) + "\n")

    # --- scoring

    def score(self, prompts, responses, ids=None) -> list[float]:
        """Raises RewardServerError (after the retries) for the first item that fails; every score received
        before that is already in the cache."""
        _check_batch(prompts, responses, ids)
        keys = [(ids[i] if ids is not None else _sha256(json.dumps(p, sort_keys=True)), _sha256(r))
                for i, (p, r) in enumerate(zip(prompts, responses))]
        todo = {}
        for key, p, r in zip(keys, prompts, responses):
            if key in self.cache:
                self.cache_hits += 1
            else:
                todo.setdefault(key, (p, r))
        if todo:
            self._run(todo)
        return [self.cache[k] for k in keys]

    def _run(self, todo: dict):
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            futures = [pool.submit(self._score_one, key, p, r) for key, (p, r) in todo.items()]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f in done and f.exception() is not None), None)
            if failed is not None:
                raise failed.exception()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # queued items dropped; running ones finish, are cached

    def _score_one(self, key, prompt, response):
        messages = self.truncate(prompt, response)
        body = json.dumps({"model": self.model, "messages": messages}).encode()
        try:
            score = parse_reward(self._post(body))
        except ValueError as e:
            raise RewardServerError(self._scrub(f"reward server {self.where}: {e}")) from None
        self._store(key, score)
        return score

    def _post(self, body: bytes) -> bytes:
        """POST with retries. Returns the reply body; raises RewardServerError when it gives up."""
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return self._request(body, attempt)
            except _Retryable as e:
                if attempt == attempts:
                    raise RewardServerError(self._scrub(
                        f"reward server {self.where}: {e.what} after {attempts} attempts")) from None
                time.sleep(e.wait if e.wait is not None else self.backoff * 2 ** (attempt - 1))

    def _request(self, body: bytes, attempt: int) -> bytes:
        """One POST. Raises _Retryable (5xx, 429, timeout, connection) or RewardServerError (other 4xx)."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                return reply.read()
        except urllib.error.HTTPError as e:
            what = f"HTTP {e.code}: {e.read()[:300].decode('utf-8', 'replace')!r}"
            if e.code == 429 or e.code >= 500:
                retry_after = e.headers.get("Retry-After", "")
                raise _Retryable(what, min(float(retry_after), 60.0) if retry_after.isdigit() else None) from None
            hint = f" (is ${self.api_key_env} set?)" if e.code in (401, 403) else ""
            raise RewardServerError(self._scrub(
                f"reward server {self.where}: {what}{hint} (attempt {attempt}, not retried)")) from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
            raise _Retryable(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None

    def _scrub(self, message: str) -> str:
        key = os.environ.get(self.api_key_env)
        return message.replace(key, "***") if key else message

    # --- truncation

    def truncate(self, prompt: list[dict], response: str) -> list[dict]:
        """prompt + [assistant response] within max_tokens - reserve: the response's beginning (at most 3/4 of the
        budget), then as much of the prompt's end as fits (earlier messages dropped, the oldest kept one cut from
        its left; a leading assistant turn left alone is dropped too)."""
        budget = self.max_tokens - self.reserve
        response = self._head(response, budget * 3 // 4)
        left = budget - self._length(response)
        kept = []
        for m in reversed(prompt):
            n = self._length(m["content"])
            if n <= left:
                kept.append(m)
                left -= n
                continue
            if left > 0:
                kept.append({**m, "content": self._tail(m["content"], left)})
            break
        kept.reverse()
        while len(kept) > 1 and kept[0]["role"] == "assistant":
            kept.pop(0)
        return kept + [{"role": "assistant", "content": response}]

    def _length(self, text: str) -> int:
        if self.tokenizer is None:
            return -(-len(text) // 3)
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _head(self, text: str, n: int) -> str:
        if self._length(text) <= n:
            return text
        if self.tokenizer is None:
            return text[:3 * n]
        return text[:self.tokenizer.encode(text, add_special_tokens=False).offsets[n][0]]

    def _tail(self, text: str, n: int) -> str:
        if self.tokenizer is None:
            return text[len(text) - 3 * n:]
        return text[self.tokenizer.encode(text, add_special_tokens=False).offsets[-n][0]:]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
