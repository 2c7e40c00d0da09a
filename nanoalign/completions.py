"""Samples from an OpenAI-compatible completions server (vLLM or SGLang serving the merged model of
`train_dpo.py --merge`), for users who outgrow one node: gen_synthetic.py / eval_winrate.py --policy-url.

    policy = HttpPolicy("http://10.0.0.5:8000/v1", model="runs/dpo/merged", stop_ids=chat.stop_ids, max_new_tokens=512,
                        temperature=0.8, top_p=0.95, seed=0, cache_path="runs/synth/policy_cache.jsonl")
    [(text, n_tokens, finished), ...] = policy.sample([(prompt_ids, (prompt_id, k)), ...])

Each sample is one request with n = 1: `prompt` is the token ids the local engine would get (the chat template is
ours, not the server's), `seed` a hash of (seed, prompt_id, k), so sample k of a prompt is the server's same draw
on every run (vLLM honours per-request seeds), and `stop_token_ids` ends it on both Qwen stop ids. Answers are
appended to a JSONL cache as they arrive and read back at start: a killed run asks only what is missing.
The transport (total deadline per attempt, retries, concurrency, prompt Ctrl-C, key handling) is
nanoalign.endpoint.Endpoint, shared with the reward client.
"""
import hashlib
import json

from nanoalign.endpoint import Endpoint, EndpointError, JsonlCache
from nanoalign.sampling import stream_key
from nanoalign.train import nonneg_int, positive_int, timeout_seconds


class PolicyServerError(RuntimeError):
    """The completions server failed for good (after retries), or sent a reply without a completion."""


def parse_completion(body: bytes) -> tuple[str, int, bool]:
    """(text, completion tokens, finished) of a completions reply with one choice; finished = it stopped on a stop
    id ("stop"), not at max_tokens ("length")."""
    try:
        reply = json.loads(body)
        choice = reply["choices"][0]
        text, n_tokens, reason = choice["text"], reply["usage"]["completion_tokens"], choice["finish_reason"]
        if isinstance(text, str) and type(n_tokens) is int and n_tokens >= 0 and isinstance(reason, str):
            return text, n_tokens, reason == "stop"  # (a null text or a count of -3 or "7" is no completion)
    except (ValueError, KeyError, IndexError, TypeError):
        pass
    raise ValueError(f"no completion in the reply (choices[0].text, finish_reason, usage.completion_tokens >= 0): "
                     f"{body[:300].decode('utf-8', 'replace')!r}")


# what a policy_cache.jsonl row holds, as parse_completion returns it for a fresh reply; any other row (another
# schema, a NaN or a string where a count belongs) is damaged: dropped when the cache is opened, and asked again
ANSWER_FIELDS = dict(text=str, n_tokens=lambda n: type(n) is int and n >= 0, finished=bool)


def add_policy_args(parser, url_flags):
    """The client flags of the completions server(s) at `url_flags` (each script adds those: one URL, or one a
    side), shared by gen_synthetic.py and eval_winrate.py as reward.add_reward_args is."""
    parser.add_argument("--policy-concurrency", type=positive_int, default=32, help=f"{url_flags}: requests in flight")
    parser.add_argument("--policy-retries", type=nonneg_int, default=4,
                        help=f"{url_flags}: retries of a failed request")
    parser.add_argument("--policy-timeout", type=timeout_seconds, default=600,
                        help=f"{url_flags}: seconds per request, > 0 and at most 1e9")


def policy_from_args(args, url, model, stop_ids, cache_path):
    """The HttpPolicy at `url` serving `model` that the sampling flags (sampling.add_sampling_args, --seed) and
    add_policy_args' flags describe; its answers cached in cache_path."""
    return HttpPolicy(url, model, stop_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                      timeout=args.policy_timeout, retries=args.policy_retries, concurrency=args.policy_concurrency,
                      cache_path=cache_path)


class HttpPolicy:
    """See the module docstring. timeout/retries/backoff/concurrency/api_key_env as in endpoint.Endpoint."""

    def __init__(self, base_url, model, stop_ids, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, seed=0,
                 api_key_env="OPENAI_API_KEY", timeout=600, retries=4, backoff=1.0, concurrency=32,
                 cache_path=None):
        self.transport = Endpoint(base_url.rstrip("/") + "/completions", api_key_env, timeout, retries, backoff,
                                  concurrency, what="policy server")
        self.settings = dict(model=model, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             stop_token_ids=list(stop_ids), n=1, skip_special_tokens=True)
        if top_k:
            self.settings["top_k"] = top_k  # vLLM / SGLang extension; not sent when off
        self.seed, self.concurrency = seed, concurrency
        self.cache = JsonlCache(cache_path, ("request_sha256",), {}, ANSWER_FIELDS)

    def payload(self, prompt_ids, key) -> dict:
        return dict(self.settings, prompt=list(prompt_ids), seed=stream_key(self.seed, key)[0])

    def sample(self, requests) -> list[tuple[str, int, bool]]:
        """[(text, n_tokens, finished)] for requests [(prompt ids, key)], in order, `concurrency` at a time.
        Raises PolicyServerError for the first request that fails; answers received before are cached."""
        payloads = [self.payload(p, key) for p, key in requests]
        shas = [hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest() for p in payloads]
        todo = {sha: p for sha, p in zip(shas, payloads) if self._answer(sha) is None}
        self.transport.map(lambda item: self._ask(*item), todo.items())
        return [self._answer(sha) for sha in shas]

    def _answer(self, sha):
        row = self.cache.get((sha,))
        return None if row is None else (row["text"], row["n_tokens"], row["finished"])

    def _ask(self, sha, payload):
        try:
            text, n_tokens, finished = self.transport.post(payload, parse_completion)
        except EndpointError as e:
            raise PolicyServerError(str(e)) from None
        self.cache.put((sha,), model=payload["model"], text=text, n_tokens=n_tokens, finished=finished)
