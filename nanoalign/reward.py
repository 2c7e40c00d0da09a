"""Reward backends behind one batched interface: a rule (the toy task), a local HF reward model, an HTTP endpoint
(nanoalign.endpoint.HttpReward).

Every backend has `score(prompts, responses, ids=None) -> list[float]`: prompts[i] is the conversation before
responses[i] (a list of {"role", "content"} messages), ids[i] a stable id of that prompt (used for caching). The
HTTP backend returns None for an item the endpoint refused (see HttpReward.skipped). No backend returns a score that
is_score refuses (NaN, inf, or beyond ±MAX_ABS_SCORE = 1e6, where differences and means overflow): a local model
raises RewardError naming the item, the endpoint's reply is asked again and the run stops after the retries.

    rm = load_reward("toy")                                     # nanoalign.toy.reward, offline
    rm = load_reward("Skywork/Skywork-Reward-V2-Qwen3-0.6B", device="cuda", dtype=torch.bfloat16)
    rm = load_reward("http", cache_path="runs/rm_cache.jsonl")  # NVIDIA Nemotron-70B-reward; key in $NVIDIA_API_KEY
    scores = rm.score([[{"role": "user", "content": "2+2?"}]], ["4"], ids=["q0"])
"""
import inspect
from pathlib import Path

import torch
import torch.nn as nn

from nanoalign import toy
from nanoalign.chat import compile_chat_template, load_chat, read_chat_template
from nanoalign.errors import InputError
from nanoalign.jsonl import read_json
from nanoalign.endpoint import MAX_ABS_SCORE, NEMOTRON_REWARD, NVIDIA_BASE_URL, EndpointError, HttpReward, is_score
from nanoalign.train import DTYPES, nonneg_int, positive_int, timeout_seconds
from nanoalign.model import (Decoder, ModelConfig, check_finite, load_weights, read_safetensors_dir,
                             resolve_model_dir)

DEFAULT_REWARD_MODEL = "Skywork/Skywork-Reward-V2-Qwen3-0.6B"
SEQ_CLS_ARCHITECTURES = ("Qwen2ForSequenceClassification", "Qwen3ForSequenceClassification")
RewardServerError = EndpointError  # the name the scripts and older code use


class RewardError(RuntimeError):
    """A reward model produced something that is not a score (NaN, inf, beyond ±MAX_ABS_SCORE) for an item."""


def load_reward(spec: str, **kw):
    """"toy" -> RuleReward; "http" -> HttpReward on NVIDIA's API; "http(s)://..." -> HttpReward on that base URL;
    anything else -> LocalRewardModel (a local dir or a hub id).

    Keyword arguments go to the backend that takes them (a script can pass device=, dtype=, batch_size=, model=,
    cache_path=, tokenizer= whatever the spec); one that no backend takes is a TypeError.
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


def unused_reward_flags(spec: str) -> list:
    """The add_reward_args flags (argparse dests) that do not apply to the backend of `spec`, so a run does not
    record them (rundir.settings_from's `unused`): the endpoint's model and tokenizer without an HTTP reward, the
    dtype without a local reward model."""
    backend = _backend(spec)[0]
    return (["reward_model", "reward_tokenizer"] if backend is not HttpReward else []) + (
        ["reward_dtype"] if backend is not LocalRewardModel else [])


def add_reward_args(parser):
    """The --reward* flags gen_synthetic.py and eval_winrate.py share."""
    parser.add_argument("--reward", default=DEFAULT_REWARD_MODEL,
                        help="`toy` (rule-based), an http(s) URL (OpenAI-compatible endpoint), or a reward model "
                             "dir / hub id")
    parser.add_argument("--reward-dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="local reward model precision (default: --precision's: bf16 on a GPU with bf16, "
                             "else fp32)")
    parser.add_argument("--reward-batch-size", type=positive_int, default=8, help="local reward model: rows per forward")
    parser.add_argument("--reward-model", default=NEMOTRON_REWARD, help="http reward: model name at the endpoint")
    parser.add_argument("--reward-tokenizer", default=None,
                        help="http reward: tokenizer (dir, tokenizer.json or hub id) counting tokens for the "
                             "endpoint's context; without it a conservative bound cuts more")
    parser.add_argument("--reward-retries", type=nonneg_int, default=4,
                        help="http reward: retries of a failed request (5xx, 429, timeout, non-finite score)")
    parser.add_argument("--reward-timeout", type=timeout_seconds, default=60,
                        help="http reward: total seconds per request, > 0 and at most 1e9")
    parser.add_argument("--reward-concurrency", type=positive_int, default=8, help="http reward: requests in flight")


def reward_from_args(args, device, cache_path, dtype=None):
    """The backend add_reward_args' flags describe; HTTP scores are cached in cache_path. A local model runs in
    --reward-dtype, else `dtype` (the scripts' --precision), else bf16 on CUDA and fp32 elsewhere."""
    if args.reward_dtype is not None:
        dtype = DTYPES[args.reward_dtype]
    elif dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return load_reward(args.reward, device=device, dtype=dtype, batch_size=args.reward_batch_size,
                       model=args.reward_model, tokenizer=args.reward_tokenizer, cache_path=cache_path,
                       retries=args.reward_retries, timeout=args.reward_timeout, concurrency=args.reward_concurrency)


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

def special_tokens(model_dir) -> dict:
    """bos_token, eos_token, ... of tokenizer_config.json as strings: what a chat template may refer to."""
    config = Path(model_dir) / "tokenizer_config.json"
    d = read_json(config) if config.exists() else {}
    tokens = {}
    for name in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        value = d.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if value is not None:
            tokens[name] = value
    return tokens


class SequenceClassifier(nn.Module):
    """HF *ForSequenceClassification: state_dict keys "model.*" and "score.weight" [num_labels, d], no bias."""

    def __init__(self, config: ModelConfig, num_labels: int):
        super().__init__()
        self.model = Decoder(config)
        self.score = nn.Linear(config.hidden_size, num_labels, bias=False)

    def forward(self, input_ids, attention_mask, last):  # last: [b] index of each row's last real token
        hidden = self.model(input_ids, attention_mask=attention_mask)    # [b, t, d]
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [b, d]
        # the head in fp32: a bf16 score would be rounded to ~3 significant digits, making ties out of near-ties
        return pooled.float() @ self.score.weight.float().T                # [b, num_labels]


class LocalRewardModel:
    """An HF Qwen2/Qwen3 sequence-classification reward model (e.g. Skywork-Reward-V2-Qwen3) run by our Decoder.

    The conversation (prompt + the response as the final assistant turn) is rendered with the model's own chat
    template (rendered by jinja2 as transformers does) and tokenised whole, as `tokenizer(apply_chat_template(conv,
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
        d = read_json(model_dir / "config.json")
        arch = (d.get("architectures") or [None])[0]
        if arch not in SEQ_CLS_ARCHITECTURES:
            raise InputError(f"{model_dir}: architecture {arch!r} is not a reward model "
                             f"(expected one of {SEQ_CLS_ARCHITECTURES})")
        self.config = ModelConfig.from_hf(d, source=str(model_dir / "config.json"))
        tensors = read_safetensors_dir(model_dir)
        tensors.discard("lm_head.weight")
        if "score.weight" not in tensors:
            raise InputError(f"{model_dir}: no 'score.weight' tensor (not a sequence-classification checkpoint?)")
        num_labels = tensors.shape["score.weight"][0]
        if num_labels != 1:
            raise InputError(f"{model_dir}: score head has {num_labels} labels; a scalar reward model has 1")
        with torch.device("meta"):
            self.model = SequenceClassifier(self.config, num_labels)
        load_weights(self.model, tensors, model_dir, dtype, device)
        check_finite(self.model, model_dir)
        self.model.eval()

        template = read_chat_template(model_dir)  # a hub snapshot brings chat_template.jinja along (*.jinja)
        if template is None:
            raise InputError(f"{model_dir}: no chat template (tokenizer_config.json 'chat_template' or "
                             f"chat_template.jinja): the reward model's input format is unknown")
        self.template, self.special_tokens = compile_chat_template(template), special_tokens(model_dir)
        self.chat = load_chat(model_dir, default_system=None)  # its tokenizer and pad id; the template formats
        self.model_dir, self.device, self.batch_size = model_dir, device, batch_size
        self.max_len, self.padding_side = max_len, padding_side
        self.truncated = 0  # rows cut to max_len so far

    def format(self, prompt: list[dict], response: str) -> str:
        """The model's chat template on prompt + [assistant response]: apply_chat_template(tokenize=False)."""
        import jinja2
        messages = prompt + [{"role": "assistant", "content": response}]
        self.chat._turns(messages)  # validation only: roles and string contents
        try:
            return self.template.render(messages=messages, add_generation_prompt=False, tools=None, documents=None,
                                        **self.special_tokens)
        except jinja2.TemplateError as e:
            raise InputError(f"{self.model_dir}: its chat template refused the conversation: {e}") from None

    def encode(self, prompt: list[dict], response: str) -> list[int]:
        """Token ids of format(prompt, response), the last max_len of them."""
        ids = self.chat.tokenizer.encode(self.format(prompt, response)).ids
        if len(ids) > self.max_len:
            self.truncated += 1
            ids = ids[-self.max_len:]
        return ids

    def score(self, prompts, responses, ids=None) -> list[float]:
        _check_batch(prompts, responses, ids)
        names = ids if ids is not None else [f"item {i}" for i in range(len(prompts))]
        return self.score_ids([self.encode(p, r) for p, r in zip(prompts, responses)], names)

    @torch.inference_mode()
    def score_ids(self, seqs: list[list[int]], names=None) -> list[float]:
        """Scores of already tokenised rows, in the order of `seqs`. Identical rows are scored once, so they get
        the very same score; rows are batched by length.

        A row's score does not depend on the rows it is batched with, up to float rounding: within 1e-5 (fp32)
        of the row scored alone on CPU (tests/test_reward.py), more in bf16 (see README).

        Raises:
            RewardError: a score is_score refuses (NaN, inf, beyond ±MAX_ABS_SCORE), naming the row (names[i]
                when given).
        """
        assert all(len(s) > 0 for s in seqs), "empty row"
        unique = list(dict.fromkeys(tuple(s) for s in seqs))
        order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
        scores = [0.0] * len(unique)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            ids, mask, last = self._pad([unique[i] for i in rows])
            # right padding needs no mask: under causal attention no real token sees the pads after it, and an
            # unmasked batch takes SDPA's fused causal path
            batch = self.model(ids, mask if self.padding_side == "left" else None, last)[:, 0].float().tolist()
            for i, s in zip(rows, batch):
                scores[i] = s
        index = {row: i for i, row in enumerate(unique)}
        out = [scores[index[tuple(s)]] for s in seqs]
        bad = next((i for i, s in enumerate(out) if not is_score(s)), None)
        if bad is not None:
            name = names[bad] if names is not None else f"row {bad}"
            raise RewardError(f"reward model {self.model_dir} ({self.model.score.weight.dtype}) gave an unusable "
                              f"score ({out[bad]:g}) for {name} (NaN, inf or beyond ±{MAX_ABS_SCORE:g}): broken "
                              f"weights, or an overflow in this dtype (try --reward-dtype fp32)")
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
