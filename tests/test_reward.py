"""Reward backends: the toy rule, a local seq-cls reward model against transformers, an HTTP endpoint against a
stub server on 127.0.0.1 (real sockets): both reply forms, retries, 4xx, give-up, cache, key handling."""
from contextlib import contextmanager
import json
import math
import os
import re
import shutil
import signal
import socketserver
import subprocess
import sys
import threading
import time

import pytest
import torch
import transformers

from nanoalign.chat import QWEN25_CHAT_TEMPLATE, QWEN_SYSTEM, load_chat
from nanoalign.errors import InputError
from nanoalign.reward import HttpReward, LocalRewardModel, RewardError, RewardServerError, RuleReward, load_reward
from nanoalign.endpoint import parse_reward, sha256
from nanoalign.toy import build_tokenizer
from conftest import make_hf_model_dir
from tests.fixtures import ROOT, json_server, serving

TOL = dict(atol=1e-4, rtol=0)

# Qwen3's chat template (tokenizer_config.json of Qwen/Qwen3-*), its no-tools branch transcribed: the reference
# that transformers' jinja renders and ours must equal.
QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and not(message.content.startswith('<tool_response>')"
    " and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = message.content %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

PROMPTS = [
    [{"role": "user", "content": "What is the largest number among 3, 17, 8?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "Find the maximum of 41, 7."},
     {"role": "assistant", "content": "<think>hm</think>\n41"},
     {"role": "user", "content": "Thank you, that was very helpful."}],
]
RESPONSES = ["17", "\nSure, here is a short answer.", "<think>\nthey thank me\n</think>\n\nYou are welcome."]


# -----------------------------------------------------------------------------
# RuleReward

def test_rule_reward_grades_hand_written_responses():
    prompt = [{"role": "user", "content": "What is the largest number among 3, 17, and 8?"}]
    responses = ["17", " 17\n", "The answer is 17.", "8", "It is 8 or 17.", "no idea", ""]
    assert RuleReward().score([prompt] * 7, responses) == [1.0, 1.0, 0.5, 0.1, 0.1, 0.0, 0.0]
    assert isinstance(load_reward("toy"), RuleReward)


# -----------------------------------------------------------------------------
# LocalRewardModel against transformers

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("toy_tokenizer"))


def make_seqcls_dir(out_dir, tok_dir, model_type="qwen2", pad_token_id=409, chat_template=None, seed=0, **overrides):
    """A tiny random HF Qwen2/Qwen3 ForSequenceClassification saved by transformers, plus the toy tokenizer
    (its tokenizer_config.json's chat_template replaced when given)."""
    make_hf_model_dir(out_dir, vocab_size=448, model_type=model_type, head="SequenceClassification", seed=seed,
                      max_position_embeddings=512, num_labels=1, pad_token_id=pad_token_id, **overrides)
    shutil.copy(tok_dir / "tokenizer.json", out_dir / "tokenizer.json")
    tok_config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    if chat_template is not None:
        tok_config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return out_dir


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory, tok_dir):
    return make_seqcls_dir(tmp_path_factory.mktemp("rm_qwen3"), tok_dir, "qwen3", chat_template=QWEN3_TEMPLATE,
                           head_dim=24)


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def rm_dir(request, tmp_path_factory, tok_dir, qwen3_dir):
    if request.param == "qwen3":
        return qwen3_dir
    return make_seqcls_dir(tmp_path_factory.mktemp("rm_qwen2"), tok_dir, "qwen2")


def hf_model(model_dir, pad_token_id="config"):
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    if pad_token_id != "config":
        hf.config.pad_token_id = pad_token_id
    return hf


def hf_score_rows(hf, seqs):
    """transformers' score of each row run alone, unpadded, read at its last token."""
    with torch.no_grad():
        return torch.tensor([hf(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs])


def random_rows(lengths, pad_id, seed=0, vocab=409):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    for r in rows:
        assert r[-1] != pad_id  # pad != last token: HF's own ids != pad rule is then right
    return rows


def test_scores_match_transformers_on_right_padded_batch(rm_dir):
    seqs = random_rows([7, 19, 3, 12, 19], pad_id=409)
    hf = hf_model(rm_dir)
    width = max(map(len, seqs))
    ids = torch.tensor([s + [409] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        ref_batched = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    rm = LocalRewardModel(rm_dir, batch_size=3)
    ours = torch.tensor(rm.score_ids(seqs))
    assert ref_batched.abs().min() > 0.05  # real, distinct values
    torch.testing.assert_close(ours, ref_batched, **TOL)
    torch.testing.assert_close(ours, hf_score_rows(hf, seqs), **TOL)


def test_pad_equal_to_eos_still_reads_last_real_token(tmp_path, tok_dir):
    """pad = eos = <|endoftext|> (Qwen base models), the last real token of every row (and one inside): an ids != pad
    rule reads an earlier token; we read the last real one, as HF does for each row alone with no pad rule."""
    eos = 409  # <|endoftext|>: also what LocalRewardModel pads with
    model_dir = make_seqcls_dir(tmp_path / "rm", tok_dir, "qwen3", pad_token_id=eos,
                                chat_template=QWEN3_TEMPLATE, seed=1)
    seqs = [s + [eos] for s in random_rows([5, 11, 8], pad_id=eos, seed=2)]
    seqs[1][4] = eos
    ref = hf_score_rows(hf_model(model_dir, pad_token_id=None), seqs)
    for kw in (dict(batch_size=3), dict(batch_size=3, padding_side="left"), dict(batch_size=1)):
        ours = torch.tensor(LocalRewardModel(model_dir, **kw).score_ids(seqs))
        torch.testing.assert_close(ours, ref, **TOL)
    # the pitfall itself: HF's pad rule on the same rows reads the token before the final <|endoftext|>
    wrong = hf_score_rows(hf_model(model_dir), seqs)
    assert (ours - wrong).abs().min() > 1e-3


def test_formatting_and_ids_match_apply_chat_template(rm_dir):
    rm = LocalRewardModel(rm_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(rm_dir))
    for prompt, response in zip(PROMPTS, RESPONSES):
        conv = prompt + [{"role": "assistant", "content": response}]
        text = hf_tok.apply_chat_template(conv, tokenize=False)
        assert rm.format(prompt, response) == text
        assert rm.encode(prompt, response) == hf_tok(text)["input_ids"]
    if "<think>" in rm.format(PROMPTS[0], "17"):
        assert rm.format(PROMPTS[0], "17").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n17<|im_end|>\n")
        assert not rm.format(PROMPTS[0], "17").startswith("<|im_start|>system")
    else:
        assert rm.format(PROMPTS[0], "17").startswith(f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n")


def test_score_equals_transformers_end_to_end(rm_dir):
    hf, hf_tok = hf_model(rm_dir), transformers.AutoTokenizer.from_pretrained(str(rm_dir))
    seqs = [hf_tok(hf_tok.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False))["input_ids"]
            for p, r in zip(PROMPTS, RESPONSES)]
    ours = torch.tensor(LocalRewardModel(rm_dir).score(PROMPTS, RESPONSES, ids=["a", "b", "c"]))
    torch.testing.assert_close(ours, hf_score_rows(hf, seqs), **TOL)


def test_scores_do_not_depend_on_batch_size_or_padding_side(rm_dir):
    prompts, responses = PROMPTS * 2, RESPONSES + ["18", "No.", "It is 41."]
    ref = torch.tensor(LocalRewardModel(rm_dir, batch_size=1).score(prompts, responses))
    for kw in (dict(batch_size=3), dict(batch_size=6), dict(batch_size=4, padding_side="left")):
        torch.testing.assert_close(torch.tensor(LocalRewardModel(rm_dir, **kw).score(prompts, responses)), ref,
                                   atol=1e-5, rtol=0)
    assert len(set(ref.tolist())) == 6


def test_long_rows_are_cut_from_the_left(rm_dir):
    prompt = [{"role": "user", "content": "Which of these numbers is the biggest: " + ", ".join(map(str, range(60)))}]
    rm = LocalRewardModel(rm_dir, max_len=40)
    full = LocalRewardModel(rm_dir).encode(prompt, "59")
    assert len(full) > 40
    assert rm.encode(prompt, "59") == full[-40:] and rm.truncated == 1
    assert rm.score([prompt], ["59"]) == pytest.approx(rm.score_ids([full[-40:]]), abs=1e-6)


# A Qwen3-2507-style template (reasoning stripped from assistant turns, no empty think block added) and a ChatML
# template written with plain block tags, whose output depends on trim_blocks/lstrip_blocks, that sets its default
# system prompt in a variable, uses bos_token and raise_exception: both were misread by substring guessing.
NO_THINK_TEMPLATE = (
    "{%- for message in messages %}{%- set content = message.content %}"
    "{%- if message.role == 'assistant' and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}{%- endfor %}"
)
BLOCKS_TEMPLATE = """{% set default_system = 'You grade answers.' %}
{{ bos_token }}
{% if messages[0]['role'] != 'system' %}
<|im_start|>system
{{ default_system }}<|im_end|>
{% endif %}
{% for message in messages %}
    {% if message['content'] == 'FORBIDDEN' %}
        {{ raise_exception('this template refuses FORBIDDEN') }}
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}<|im_end|>
{% endfor %}
"""


@pytest.mark.parametrize("template,where", [(QWEN3_TEMPLATE, "tokenizer_config.json"),
                                            (QWEN25_CHAT_TEMPLATE, "tokenizer_config.json"),
                                            (NO_THINK_TEMPLATE, "chat_template.jinja"),
                                            (BLOCKS_TEMPLATE, "chat_template.jinja")],
                         ids=["qwen3", "qwen2.5", "no-think", "blocks"])
def test_any_chat_template_renders_as_transformers_does(tmp_path, qwen3_dir, template, where):
    """The reward model's own template, rendered by jinja2 as apply_chat_template renders it: multi-turn, <think>
    in earlier turns, whitespace control, variables, special tokens; from tokenizer_config.json or (transformers
    5 layout) chat_template.jinja."""
    model_dir = shutil.copytree(qwen3_dir, tmp_path / "rm")
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    tok_config["bos_token"] = "<|endoftext|>"
    if where == "chat_template.jinja":
        (model_dir / where).write_text(template)
    else:
        tok_config["chat_template"] = template
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tok_config))
    rm = LocalRewardModel(model_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    assert hf_tok.chat_template == template
    long_chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nx\n</think>\n\nb"},
                 {"role": "user", "content": " c "}, {"role": "assistant", "content": "d</think>e"},
                 {"role": "user", "content": "f"}]
    for prompt, response in zip(PROMPTS + [long_chat], RESPONSES + ["<think>y</think>g"]):
        text = hf_tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        assert rm.format(prompt, response) == text
        assert rm.encode(prompt, response) == hf_tok(text)["input_ids"]
    if template is BLOCKS_TEMPLATE:
        system = "<|endoftext|>\n<|im_start|>system\nYou grade answers.<|im_end|>\n"
        assert rm.format(PROMPTS[0], "17").startswith(system)
        with pytest.raises(ValueError, match="refuses FORBIDDEN"):
            rm.format(PROMPTS[0], "FORBIDDEN")
    if template is NO_THINK_TEMPLATE:
        assert rm.format(long_chat, "ok").endswith("<|im_start|>assistant\nok<|im_end|>\n")


def test_reward_model_errors(tmp_path, qwen3_dir):
    model_dir = shutil.copytree(qwen3_dir, tmp_path / "rm")
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template")
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(ValueError, match="no chat template"):
        LocalRewardModel(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(ValueError, match="not a reward model"):
        LocalRewardModel(model_dir)


def test_scores_are_batch_invariant_and_identical_rows_tie(qwen3_dir):
    """A row's score alone, in a batch of 8, left or right of a long row (right or left padding): the same within
    1e-5 in fp32 (scores of order 5). Identical rows get the very same score, even where the old batching put
    them in batches of different widths (one beside short rows, one beside a long row)."""
    rows = random_rows([20, 23, 25, 21, 30, 19, 22, 26], pad_id=409, seed=3)
    long, x = random_rows([200], pad_id=409, seed=4)[0], rows[0]
    rm = LocalRewardModel(qwen3_dir, batch_size=8)
    alone = rm.score_ids([x])[0]
    assert abs(alone) > 1
    contexts = [rm.score_ids(rows)[0], rm.score_ids([long, x])[1], rm.score_ids([x, long])[0],
                LocalRewardModel(qwen3_dir, padding_side="left").score_ids([long, x])[1]]
    assert max(abs(s - alone) for s in contexts) <= 1e-5
    rm = LocalRewardModel(qwen3_dir, batch_size=3)
    scores = rm.score_ids([rows[5], x, rows[3], x, long])  # sorted by length: [19, 20, 21 | 20, 200]
    assert scores[1] == scores[3]
    prompt, response = PROMPTS[0], "It is 17."
    scores = rm.score([prompt, PROMPTS[1], prompt, PROMPTS[2]], [response, "x" * 300, response, "y"])
    assert scores[0] == scores[2]


def test_non_finite_local_score_is_a_clear_error(qwen3_dir):
    rm = LocalRewardModel(qwen3_dir)
    with torch.no_grad():
        rm.model.score.weight[0, 0] = float("nan")
    with pytest.raises(RewardError, match=r"unusable score \(nan\) for p7 \(NaN, inf or beyond ±1e\+06\)"):
        rm.score([PROMPT], ["17"], ids=["p7"])



def test_out_of_range_local_score_is_a_clear_error(qwen3_dir):
    """A finite score beyond ±1e6 (its differences and means overflow downstream) is refused like a NaN."""
    rm = LocalRewardModel(qwen3_dir)
    with torch.no_grad():
        rm.model.score.weight.fill_(1e30)  # |score| = 1e30 * |sum of the final hidden state|: finite, huge
    with pytest.raises(RewardError, match=r"unusable score \(-?\d\.\d+e\+3\d\) for p8 \(NaN, inf or beyond ±1e\+06\)"):
        rm.score([PROMPT], ["17"], ids=["p8"])


def test_reward_model_with_nan_weights_is_refused_at_load(tmp_path, qwen3_dir):
    from safetensors.torch import load_file, save_file
    model_dir = shutil.copytree(qwen3_dir, tmp_path / "rm")
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.1.self_attn.k_norm.weight"][3] = float("nan")
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=rf"^{re.escape(str(model_dir))}: tensor 'model.layers.1.self_attn.k_norm"
                                         rf"\.weight' holds NaN or inf \(as float32\)"):
        LocalRewardModel(model_dir)


# -----------------------------------------------------------------------------
# HttpReward against a stub server

SECRET = "nvapi-test-SECRET-0123456789"


def logprob_reply(score):
    return {"id": "r", "object": "chat.completion", "model": "nvidia/llama-3.1-nemotron-70b-reward",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "length",
                         "logprobs": {"content": [{"token": "reward", "logprob": score, "bytes": None,
                                                   "top_logprobs": []}]}}]}


def content_reply(score):
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"reward:{score}"},
                         "logprobs": None}]}


def expected(response: str) -> float:
    return len(response) - 0.25


class Stub:
    """What the server does: respond(body, n, headers) -> (status, payload); records every request."""

    def __init__(self):
        self.requests, self.lock = [], threading.Lock()
        self.inflight = self.max_inflight = 0
        self.delay = 0.0
        self.respond = lambda body, n, headers: (200, logprob_reply(expected(body["messages"][-1]["content"])))

    def handle(self, path, headers, body):
        with self.lock:
            self.requests.append({"path": path, "auth": headers.get("Authorization"), "body": body})
            n = len(self.requests)
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        time.sleep(self.delay)
        reply = self.respond(body, n, headers)
        with self.lock:
            self.inflight -= 1
        return reply


@pytest.fixture
def stub():
    stub = Stub()
    with json_server(stub.handle) as stub.url:
        yield stub


def fast(url, **kw):
    return HttpReward(url, **{"backoff": 0.01, "timeout": 5, **kw})


PROMPT = [{"role": "user", "content": "What is the largest number among 3, 17, 8?"}]


def test_parses_logprob_form_and_posts_the_conversation(stub, monkeypatch):
    monkeypatch.setenv("NVIDIA_API_KEY", SECRET)
    responses = ["17", "The answer is 17.", "8", "a longer answer than the others"]
    scores = fast(stub.url).score([PROMPT] * 4, responses)
    assert scores == [expected(r) for r in responses]
    req = stub.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {SECRET}"
    assert req["body"]["model"] == "nvidia/llama-3.1-nemotron-70b-reward"
    sent = {r["body"]["messages"][-1]["content"]: r["body"]["messages"] for r in stub.requests}
    assert sent["8"] == PROMPT + [{"role": "assistant", "content": "8"}]


def test_parses_content_form_and_rejects_neither(stub, monkeypatch):
    monkeypatch.delenv("NVIDIA_API_KEY", raising=False)
    stub.respond = lambda body, n, h: (200, content_reply(-3.5))
    assert fast(stub.url).score([PROMPT], ["17"]) == [-3.5]
    assert stub.requests[0]["auth"] is None
    stub.respond = lambda body, n, h: (200, {"choices": [{"message": {"content": "I think it is good"}}]})
    with pytest.raises(RewardServerError, match="I think it is good"):
        fast(stub.url).score([PROMPT], ["17"])
    assert parse_reward(b'{"choices":[{"message":{"content":"helpfulness:1.5,reward:2.25"}}]}') == 2.25
    assert parse_reward(json.dumps(logprob_reply(-7.125)).encode()) == -7.125


def test_retries_a_500_then_succeeds(stub):
    stub.respond = lambda body, n, h: (500, {"error": "busy"}) if n <= 2 else (200, logprob_reply(1.5))
    assert fast(stub.url, retries=4).score([PROMPT], ["17"]) == [1.5]
    assert len(stub.requests) == 3


def test_401_fails_at_once_and_never_shows_the_key(stub, monkeypatch):
    monkeypatch.setenv("NVIDIA_API_KEY", SECRET)
    # a server that echoes the request's Authorization header in its error body
    stub.respond = lambda body, n, h: (401, {"error": f"bad key {h.get('Authorization')}"})
    with pytest.raises(RewardServerError) as err:
        fast(stub.url, retries=4).score([PROMPT], ["17"])
    assert len(stub.requests) == 1
    message = str(err.value)
    assert "HTTP 401" in message and "(is $NVIDIA_API_KEY set?)" in message and "attempt 1" in message
    assert f"{stub.url}/chat/completions" in message
    assert SECRET not in message and "\n" not in message
    with pytest.raises(ValueError, match="NVIDIA_API_KEY") as err:
        HttpReward(stub.url.replace("http://", "http://user:pw@"))
    assert "pw" not in str(err.value)


def test_gives_up_after_retries_with_finished_scores_cached(stub, tmp_path):
    cache = tmp_path / "cache.jsonl"
    responses, ids = ["a", "bb", "boom", "dddd"], ["p0", "p1", "p2", "p3"]
    stub.respond = lambda body, n, h: ((500, {"error": "down"}) if body["messages"][-1]["content"] == "boom"
                                       else (200, logprob_reply(expected(body["messages"][-1]["content"]))))
    with pytest.raises(RewardServerError) as err:
        fast(stub.url, retries=2, concurrency=1, cache_path=cache).score([PROMPT] * 4, responses, ids=ids)
    assert "HTTP 500" in str(err.value) and "after 3 attempts" in str(err.value)
    assert sum(r["body"]["messages"][-1]["content"] == "boom" for r in stub.requests) == 3
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    cached = {row["id"] for row in rows}
    assert {"p0", "p1"} <= cached and "p2" not in cached  # asked in order, one at a time: a, bb done before boom
    assert all(row["score"] == expected(responses[ids.index(row["id"])]) for row in rows)

    # a restarted run asks only what is missing
    stub.respond = lambda body, n, h: (200, logprob_reply(expected(body["messages"][-1]["content"])))
    before = len(stub.requests)
    again = fast(stub.url, cache_path=cache)
    assert again.score([PROMPT] * 4, responses, ids=ids) == [expected(r) for r in responses]
    assert len(stub.requests) - before == 4 - len(cached) and again.cache_hits == len(cached)
    before = len(stub.requests)
    assert fast(stub.url, cache_path=cache).score([PROMPT] * 4, responses, ids=ids) == [expected(r) for r in responses]
    assert len(stub.requests) == before
    # the key includes the response: a new response to a cached prompt is asked
    assert fast(stub.url, cache_path=cache).score([PROMPT], ["new"], ids=["p0"]) == [expected("new")]
    assert len(stub.requests) == before + 1


def test_a_refused_item_is_skipped_counted_and_not_asked_again(stub, tmp_path):
    """HTTP 400 (e.g. over the endpoint's context) for one item: None for it, the others scored, the refusal
    cached, so a rerun neither asks it again nor fails on it."""
    cache = tmp_path / "cache.jsonl"
    stub.respond = lambda body, n, h: ((400, {"error": "input is longer than 4096 tokens"})
                                       if body["messages"][-1]["content"] == "huge"
                                       else (200, logprob_reply(expected(body["messages"][-1]["content"]))))
    rm = fast(stub.url, cache_path=cache)
    assert rm.score([PROMPT] * 3, ["a", "huge", "ccc"], ids=["p0", "p1", "p2"]) == [expected("a"), None,
                                                                                   expected("ccc")]
    assert sum(r["body"]["messages"][-1]["content"] == "huge" for r in stub.requests) == 1  # not retried
    assert list(rm.skipped) == [("p1", sha256("huge"))] and "longer than 4096" in rm.skipped[("p1", sha256("huge"))]
    before = len(stub.requests)
    again = fast(stub.url, cache_path=cache)
    assert again.score([PROMPT] * 3, ["a", "huge", "ccc"], ids=["p0", "p1", "p2"]) == [expected("a"), None,
                                                                                      expected("ccc")]
    assert len(stub.requests) == before and len(again.skipped) == 1
    # an endpoint that refuses everything (a wrong model name, say) is an error, not a run of skips
    stub.respond = lambda body, n, h: (400, {"error": "unknown model"})
    with pytest.raises(RewardServerError, match="the first 3 items were all refused.*unknown model"):
        fast(stub.url, refusals_before_stop=3, concurrency=1).score([PROMPT] * 5, list("vwxyz"))


def test_non_finite_scores_are_retried_never_returned(stub):
    replies = {1: float("nan"), 2: float("inf")}
    stub.respond = lambda body, n, h: (200, json.dumps(logprob_reply(replies.get(n, 2.5))).encode())
    assert fast(stub.url, retries=2).score([PROMPT], ["17"]) == [2.5] and len(stub.requests) == 3
    stub.respond = lambda body, n, h: (200, content_reply(float("-inf")))
    with pytest.raises(RewardServerError, match="unusable score -inf in the reply .* after 2 attempts"):
        fast(stub.url, retries=1).score([PROMPT], ["18"])


@contextmanager
def trickling_server(seconds):
    """An HTTP server on 127.0.0.1 that sends a status line and headers, then one body byte per 0.1 s for
    `seconds` (each read gets a byte well within any per-read timeout), then closes."""
    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            self.rfile.readline()
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    self.wfile.write(b" ")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.1)

    with serving(socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)) as url:
        yield url


def test_timeout_is_a_total_deadline_per_request():
    """A reply trickling a byte every 0.1 s: timeout=0.5 ends each attempt at 0.5 s (a per-read timeout never
    would: the old client waited out the whole 8 s trickle, twice)."""
    with trickling_server(8) as url:
        start = time.monotonic()
        with pytest.raises(RewardServerError, match="no complete reply within 0.5 s after 2 attempts"):
            fast(url, timeout=0.5, retries=1).score([PROMPT], ["17"])
        assert time.monotonic() - start < 2.5


def test_ctrl_c_stops_scoring_within_seconds(stub, tmp_path):
    """A real process scoring against an endpoint that answers some items and hangs on others (timeout 60 s, 4
    retries): SIGINT ends it within seconds, and the answered items are in the cache."""
    release = threading.Event()

    def respond(body, n, h):
        content = body["messages"][-1]["content"]
        if content.startswith("slow"):
            release.wait(30)
        return 200, logprob_reply(expected(content))

    stub.respond = respond
    cache = tmp_path / "cache.jsonl"
    code = (f"from nanoalign.reward import load_reward\n"
            f"rm = load_reward({stub.url!r}, cache_path={str(cache)!r}, concurrency=3, timeout=60, retries=4)\n"
            f"rm.score([[{{'role': 'user', 'content': 'q'}}]] * 6, ['a', 'bb', 'slow1', 'slow2', 'slow3', 'c'])\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 30
        while sum(r["body"]["messages"][-1]["content"].startswith("slow") for r in stub.requests) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "the child never reached the slow items"
            time.sleep(0.05)
        time.sleep(0.2)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
        assert time.monotonic() - start < 3, "Ctrl-C took more than 3 s"
        assert proc.returncode != 0 and "KeyboardInterrupt" in stderr
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    cached = {json.loads(line)["response_sha256"] for line in cache.read_text().splitlines()}
    assert {sha256("a"), sha256("bb")} <= cached and sha256("slow1") not in cached


def test_timeouts_are_retried_then_reported(stub):
    stub.delay = 0.3
    with pytest.raises(RewardServerError, match="after 2 attempts"):
        fast(stub.url, timeout=0.05, retries=1).score([PROMPT], ["17"])
    assert len(stub.requests) == 2


def test_concurrency_limit(stub):
    stub.delay = 0.05
    responses = [str(i) * (i + 1) for i in range(9)]
    assert fast(stub.url, concurrency=3).score([PROMPT] * 9, responses) == [expected(r) for r in responses]
    assert 2 <= stub.max_inflight <= 3


def test_truncation_keeps_response_and_prompt_end(stub, tok_dir):
    long_prompt = [{"role": "user", "content": "first question " * 50},
                   {"role": "assistant", "content": "first answer " * 50},
                   {"role": "user", "content": "numbers " * 100 + "END"}]
    response = "The answer is 17."
    rm = fast(stub.url, max_tokens=100, reserve=0)  # 100 tokens ~ 300 characters
    sent = rm.truncate(long_prompt, response)
    assert [m["role"] for m in sent] == ["user", "assistant"] and sent[-1]["content"] == response
    assert sent[0]["content"].endswith("numbers END") and len(sent[0]["content"]) + len(response) <= 300
    chat = load_chat(tok_dir)
    rm = fast(stub.url, max_tokens=100, reserve=0, tokenizer=tok_dir)  # what --reward-tokenizer passes
    sent = rm.truncate(long_prompt, response)
    n_tokens = sum(len(chat.encode(m["content"])) for m in sent)
    assert 90 <= n_tokens <= 100 and sent[-1]["content"] == response and sent[0]["content"].endswith("END")
    assert rm.truncate(PROMPT, response) == PROMPT + [{"role": "assistant", "content": response}]
    # what is sent is the truncated conversation
    fast(stub.url, max_tokens=100, reserve=0).score([long_prompt], [response])
    assert stub.requests[-1]["body"]["messages"][-1]["content"] == response


def test_without_a_tokenizer_cjk_text_is_cut_conservatively(stub, tok_dir):
    """The field case: 11,626 CJK characters were sent whole under a 3-characters-per-token guess. Without a
    tokenizer the fallback bound holds for byte-level BPE (the toy tokenizer spends up to 3 tokens on a CJK
    character): what is sent fits the budget in real tokens; with the tokenizer, more is kept, still within it.
    (ASCII keeps the 3-characters-per-token guess, true of real tokenizers, not of the toy one: not tested.)"""
    chat = load_chat(tok_dir)
    prompt = [{"role": "user", "content": "請解釋這段文字的意思並總結重點。" * 727}]  # 11,632 chars
    response = "好的，這是摘要：" + "不錯。" * 100
    for tokenizer in (None, tok_dir):
        sent = fast(stub.url, tokenizer=tokenizer).truncate(prompt, response)
        n = sum(len(chat.encode(m["content"])) for m in sent)
        assert n <= 4096 - 96 and sent[-1]["content"] == response and sent[0]["content"].endswith("重點。")
        assert n > 3000 or tokenizer is None
    for text in ("數字和漢字", "é" * 50, "ü😀"):  # beyond ASCII: one token per UTF-8 byte at most
        assert fast(stub.url)._length(text) >= len(chat.encode(text))


def test_load_reward_routes_keyword_arguments(stub, qwen3_dir, tmp_path):
    shared = dict(device="cpu", batch_size=2, model="my-rm", cache_path=tmp_path / "c.jsonl")  # as the scripts do
    assert isinstance(load_reward("toy", **shared), RuleReward)
    http = load_reward(stub.url, **shared)
    assert isinstance(http, HttpReward) and http.model == "my-rm" and http.url == f"{stub.url}/chat/completions"
    assert load_reward("http").url == "https://integrate.api.nvidia.com/v1/chat/completions"
    local = load_reward(str(qwen3_dir), **shared)
    assert isinstance(local, LocalRewardModel) and local.batch_size == 2
    with pytest.raises(TypeError, match="bacth_size"):
        load_reward("toy", bacth_size=2)


def test_reward_flags(stub, qwen3_dir, tok_dir, tmp_path):
    """--reward-dtype (default fp32 on CPU, bf16 on CUDA) reaches the local model; --reward-tokenizer the client."""
    import argparse
    from nanoalign.reward import add_reward_args, reward_from_args
    parser = argparse.ArgumentParser()
    add_reward_args(parser)
    rm = reward_from_args(parser.parse_args(["--reward", str(qwen3_dir)]), "cpu", tmp_path / "c.jsonl")
    assert rm.model.model.embed_tokens.weight.dtype == torch.float32
    rm = reward_from_args(parser.parse_args(["--reward", str(qwen3_dir), "--reward-dtype", "bf16"]), "cpu", None)
    assert rm.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(math.isfinite(s) for s in rm.score(PROMPTS, RESPONSES))
    args = parser.parse_args(["--reward", stub.url, "--reward-tokenizer", str(tok_dir), "--reward-timeout", "3"])
    http = reward_from_args(args, "cpu", tmp_path / "c.jsonl")
    assert http.tokenizer.get_vocab_size() == load_chat(tok_dir).vocab_size and http.endpoint.timeout == 3
    with pytest.raises(FileNotFoundError, match="tokenizer not found: nowhere"):
        reward_from_args(parser.parse_args(["--reward", stub.url, "--reward-tokenizer", "nowhere"]), "cpu", None)
