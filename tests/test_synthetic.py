"""gen_synthetic.py and eval_winrate.py run as a user runs them, on the toy task: scores are the reward's, pairs are
each prompt's (best, worst), train_dpo.py reads the pairs, a run stopped by a failing reward endpoint (a stub
server on 127.0.0.1, real sockets) or by a kill resumes without losing, duplicating or re-scoring anything, and
the win rate summary is nanoalign.preferences.win_rate of the per-prompt scores.

The policy is a "digit model": a tiny Qwen2 whose layers write nothing to the residual stream, so the next token
depends on the current one only (a bigram table in embed_tokens / lm_head). After the prompt it names a digit,
after a digit it mostly stops: on prompts over 0..9 its answers are sometimes right, sometimes a listed number,
sometimes neither, which gives the toy reward something to rank (a random init would only ever score 0).
"""
from collections import Counter, defaultdict
import hashlib
import json
import math
import random
import re
import threading
from types import SimpleNamespace

import pytest
import torch

from nanoalign import toy
from nanoalign.chat import load_chat
from nanoalign.data import prompt_records, read_records
from nanoalign.model import CausalLM, ModelConfig, load_model, save_model
from nanoalign.preferences import win_rate
from nanoalign.sampling import generate_texts
from tests.fixtures import cached_toy_setup, json_server, read_metrics, run_script, write_jsonl

CPU = ("--precision", "fp32", "--device", "cpu", "--max-new-tokens", 2)
N = 3  # samples per prompt
# first-digit logits of the policies: the sampler favours 7-9; greedy, A says "9" and B says "7"
POLICY = [4.0] * 7 + [5.0, 5.5, 6.0]
SEVEN = [4.0] * 7 + [6.0, 5.0, 5.0]
FIELDS = {"prompt_id", "prompt", "sample", "response", "score", "n_tokens", "finished"}


def digit_model(setup, out_dir, first, stop=8.0, again=4.0):
    """Save a bigram "digit model" (see the module docstring) and return its dir.

    The final RMSNorm turns the one-hot residual e_k into 8 e_k (sqrt of hidden 64), so lm_head entries are
    logits / 8. Row class 0: any non-digit token (the prompt ends in "\\n"); class 1: a digit.

    Args:
        first: 10 logits of the digits after a non-digit token (every other token: 0).
        stop, again: logits of <|im_end|> and of each digit after a digit.
    """
    chat = load_chat(setup.tokenizer)
    config = toy.tiny_config(setup.vocab_size, bos_token_id=chat.endoftext_id, eos_token_id=chat.im_end_id,
                             tie_word_embeddings=False)
    model = CausalLM(ModelConfig.from_hf(config)).init_weights(seed=0)
    digits = [chat.encode(str(d))[0] for d in range(10)]
    with torch.no_grad():
        for layer in model.model.layers:  # attention and MLP still run, but add nothing to the residual stream
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0
        emb[digits, 0] = 0.0
        emb[digits, 1] = 1.0
        head.zero_()
        head[digits, 0] = torch.tensor(first) / 8
        head[digits, 1] = again / 8
        head[chat.im_end_id, 1] = stop / 8
    return save_model(model, out_dir, tokenizer_from=setup.tokenizer)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    toy_setup = cached_toy_setup(tmp_path_factory)
    root = tmp_path_factory.mktemp("synthetic")
    prompts = []
    for seed, path in ((0, root / "prompts.jsonl"), (1, root / "eval_prompts.jsonl")):
        rng = random.Random(seed)
        prompts.append(write_jsonl(path, [{"prompt": toy.make_prompt(rng, high=9)[0][0]["content"]}
                                          for _ in range(8)]))
    return dict(policy=digit_model(toy_setup, root / "policy", POLICY),
                seven=digit_model(toy_setup, root / "seven", SEVEN),
                prompts=prompts[0], eval_prompts=prompts[1], root=root)


def gen(setup, out, *args, check=True):
    return run_script("gen_synthetic.py", "--model", setup["policy"], "--prompts", setup["prompts"], "--n", N,
                      "--out", out, *CPU, *args, check=check)


def groups(rows):
    """{prompt_id: [rows]} in file order."""
    by_prompt = defaultdict(list)
    for r in rows:
        by_prompt[r["prompt_id"]].append(r)
    return dict(by_prompt)


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_complete(rows, prompts):
    """n rows per prompt, samples 0..n-1 each, no duplicate (prompt_id, sample), prompts in their order."""
    by_prompt = groups(rows)
    assert list(by_prompt) == [pid for pid, _ in prompts]
    for pid, messages in prompts:
        assert sorted(r["sample"] for r in by_prompt[pid]) == list(range(N))
        assert all(r["prompt"] == messages for r in by_prompt[pid])
    assert len({(r["prompt_id"], r["sample"]) for r in rows}) == len(rows) == N * len(prompts)


# -----------------------------------------------------------------------------
# gen_synthetic.py with the toy reward

TOY_ARGS = ("--reward", "toy", "--min-gap", 0.5, "--batch-size", 3)


@pytest.fixture(scope="module")
def toy_run(setup):
    out = setup["root"] / "toy_run"
    proc = gen(setup, out, *TOY_ARGS)
    assert "8 prompts: 0 done before, 8 to sample" in proc.stdout
    return out


def test_samples_are_scored_by_the_toy_reward(setup, toy_run):
    prompts = prompt_records(read_records(setup["prompts"]))
    rows = read_rows(toy_run / "samples.jsonl")
    check_complete(rows, prompts)
    for r in rows:
        assert set(r) == FIELDS
        assert r["score"] == toy.reward(r["prompt"], r["response"])
        assert 1 <= r["n_tokens"] <= 2 and (r["finished"] or r["n_tokens"] == 2)  # unfinished = cut at 2
    # the digit model gives the reward something to rank: right, listed-but-wrong and unlisted answers
    assert {0.0, 1.0} <= {r["score"] for r in rows}
    assert any(r["finished"] for r in rows) and not all(r["finished"] for r in rows)


def test_pairs_are_best_and_worst_above_the_gap(toy_run):
    rows = read_rows(toy_run / "samples.jsonl")
    pairs = read_rows(toy_run / "pairs.jsonl")
    expected = {}
    for pid, group in groups(rows).items():
        best, worst = max(r["score"] for r in group), min(r["score"] for r in group)
        if best - worst >= 0.5:
            expected[pid] = (best, worst)
    assert 0 < len(expected) < 8, "the run should keep some prompts and drop others"
    assert [p["prompt_id"] for p in pairs] == list(expected)
    by_prompt = groups(rows)
    for p in pairs:
        group = by_prompt[p["prompt_id"]]
        assert (p["score_chosen"], p["score_rejected"]) == expected[p["prompt_id"]]
        assert p["chosen"] in [r["response"] for r in group if r["score"] == p["score_chosen"]]
        assert p["rejected"] in [r["response"] for r in group if r["score"] == p["score_rejected"]]
        assert p["prompt"] == group[0]["prompt"]

    summary = json.loads((toy_run / "summary.json").read_text())
    assert summary == dict(prompts=8, samples=8 * N, pairs=len(pairs), unusable_samples=0,
                           prompts_below_gap=8 - len(pairs),
                           mean_score=pytest.approx(sum(r["score"] for r in rows) / len(rows)),
                           truncated=sum(not r["finished"] for r in rows),
                           empty=sum(not r["response"].strip() for r in rows))


def test_train_dpo_reads_the_pairs(setup, toy_run, tmp_path):
    n_pairs = len(read_rows(toy_run / "pairs.jsonl"))
    proc = run_script("train_dpo.py", "--model", setup["policy"], "--data", toy_run / "pairs.jsonl",
                      "--out", tmp_path / "dpo", "--max-steps", 1, "--batch-size", 1, "--eval-frac", 0,
                      "--save-every", 0, "--precision", "fp32", "--device", "cpu")
    assert f"{n_pairs} train / 0 eval pairs" in proc.stdout
    metrics = [m for m in read_metrics(tmp_path / "dpo") if "loss" in m]
    assert len(metrics) == 1 and metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 0: policy = ref
    assert (tmp_path / "dpo" / "final").is_dir()


def test_a_killed_run_redoes_the_partial_prompt(setup, toy_run, tmp_path):
    """Killed while writing the 3rd sample of the 4th prompt: the torn line and the two whole rows of that prompt
    are dropped and the prompt is sampled again. The cut is at a --batch-size boundary (3 prompts), so the
    restarted run samples with the seeds the uninterrupted one used and ends with the very same file."""
    full = (toy_run / "samples.jsonl").read_bytes()
    lines = full.splitlines(keepends=True)
    out = tmp_path / "killed"
    out.mkdir()
    (out / "samples.jsonl").write_bytes(b"".join(lines[:3 * N + 2]) + lines[3 * N + 2][:25])
    proc = gen(setup, out, *TOY_ARGS)
    assert "8 prompts: 3 done before, 5 to sample" in proc.stdout
    assert (out / "samples.jsonl").read_bytes() == full
    check_complete(read_rows(out / "samples.jsonl"), prompt_records(read_records(setup["prompts"])))
    assert (out / "pairs.jsonl").read_bytes() == (toy_run / "pairs.jsonl").read_bytes()
    assert not (out / "samples.tmp").exists()


# -----------------------------------------------------------------------------
# gen_synthetic.py against an HTTP reward endpoint that fails, then recovers

def stub_score(question, response):
    """The stub server's reward: a deterministic function of the pair, in {0, 0.25, ..., 1}."""
    return int(hashlib.sha256(f"{question}\0{response}".encode()).hexdigest()[:8], 16) % 5 / 4


def stub_reply(stub, path, headers, body):
    """Nemotron's logprob reply with stub_score, or a 500 for every request after `fail_after` successful ones."""
    messages = body["messages"]
    key = (messages[-2]["content"], messages[-1]["content"])  # (question, response)
    with stub.lock:
        failing = stub.fail_after is not None and stub.ok >= stub.fail_after
        stub.ok += not failing
        stub.log.append((500 if failing else 200, key))
    if failing:
        return 500, {"error": "model overloaded"}
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                              "logprobs": {"content": [{"token": "reward", "logprob": stub_score(*key)}]}}]}


@pytest.fixture
def stub():
    """A Nemotron-style reward endpoint; log: (status, (question, response)) of every request; ok: 200s so far."""
    stub = SimpleNamespace(lock=threading.Lock(), log=[], ok=0, fail_after=None)
    with json_server(lambda *request: stub_reply(stub, *request)) as stub.url:
        yield stub


def test_reward_server_failure_then_resume(setup, stub, tmp_path):
    out = tmp_path / "http"
    prompts = prompt_records(read_records(setup["prompts"]), 6)
    args = ("--max-prompts", 6, "--batch-size", 2, "--reward", stub.url, "--reward-retries", 1,
            "--reward-timeout", 10, "--reward-concurrency", 2)

    # run 1: the server dies after 8 scores, in the middle of the second or a later batch of 2 prompts
    stub.fail_after = 8
    proc = gen(setup, out, *args, check=False)
    assert proc.returncode != 0
    error = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert error.startswith("error: reward server http://127.0.0.1") and error.endswith("after 2 attempts"), error
    assert "HTTP 500" in error
    ok_1 = {key for status, key in stub.log if status == 200}
    assert len(ok_1) == 8 and any(status == 500 for status, _ in stub.log)
    before = (out / "samples.jsonl").read_bytes()
    rows = read_rows(out / "samples.jsonl")
    done = len(groups(rows))
    assert done in (2, 4), "whole batches of 2 prompts are on disk, nothing of the failed one"
    check_complete(rows, prompts[:done])
    done_keys = {(r["prompt"][-1]["content"], r["response"]) for r in rows}
    assert done_keys <= ok_1 and ok_1 - done_keys, "the failed batch had scores in the cache already"

    # run 2: the server is back; the same command finishes the job
    stub.fail_after, n_log = None, len(stub.log)
    proc = gen(setup, out, *args)
    assert f"6 prompts: {done} done before, {6 - done} to sample" in proc.stdout
    after = (out / "samples.jsonl").read_bytes()
    assert after.startswith(before)
    rows = read_rows(out / "samples.jsonl")
    check_complete(rows, prompts)
    for r in rows:
        assert r["score"] == stub_score(r["prompt"][-1]["content"], r["response"])
    # only what was never scored is asked: the failed batch was sampled again with the same seed, its cached
    # scores reused
    asked_2 = [key for _, key in stub.log[n_log:]]
    final_keys = {(r["prompt"][-1]["content"], r["response"]) for r in rows}
    assert ok_1 <= final_keys
    assert len(asked_2) == len(set(asked_2)) and set(asked_2) == final_keys - ok_1
    pairs = read_rows(out / "pairs.jsonl")
    assert json.loads((out / "summary.json").read_text())["pairs"] == len(pairs)
    assert {p["prompt_id"] for p in pairs} <= {pid for pid, _ in prompts}


# -----------------------------------------------------------------------------
# eval_winrate.py

def evaluate(setup, out, *args, check=True):
    return run_script("eval_winrate.py", "--model-a", setup["policy"], "--name-a", "nines",
                      "--prompts", setup["eval_prompts"], "--reward", "toy", "--batch-size", 3, "--out", out,
                      *CPU, *args, check=check)


def check_verdicts(out, prompts, tie_eps):
    """per_prompt.jsonl rows scored by the toy reward, winners by the scores; summary = win_rate of them."""
    rows = read_rows(out / "per_prompt.jsonl")
    assert [r["prompt_id"] for r in rows] == [pid for pid, _ in prompts]
    for r, (_, messages) in zip(rows, prompts):
        assert r["prompt"] == messages
        assert r["score_a"] == toy.reward(messages, r["response_a"])
        assert r["score_b"] == toy.reward(messages, r["response_b"])
        d = r["score_a"] - r["score_b"]
        assert r["winner"] == ("a" if d > tie_eps else "b" if d < -tie_eps else "tie")
    summary = json.loads((out / "summary.json").read_text())
    expected = win_rate([r["score_a"] for r in rows], [r["score_b"] for r in rows], tie_eps)
    for k, v in expected.items():
        assert summary[k] == (pytest.approx(v, nan_ok=True) if k != "ci95" else pytest.approx(v)), k
    return rows, summary


def test_eval_model_vs_model_and_rerun(setup, tmp_path):
    out = tmp_path / "ab"
    prompts = prompt_records(read_records(setup["eval_prompts"]))
    proc = evaluate(setup, out, "--model-b", setup["seven"], "--name-b", "sevens")
    assert "8 prompts: 0 judged before, 8 to go" in proc.stdout
    rows, summary = check_verdicts(out, prompts, 0.0)
    # greedy answers, the same as sampling each model here
    chat = load_chat(setup["policy"])
    conversations = [m for _, m in prompts]
    for side, model_dir in (("a", setup["policy"]), ("b", setup["seven"])):
        texts = generate_texts(load_model(model_dir), chat, conversations, 2, temperature=0.0)
        assert [r[f"response_{side}"] for r in rows] == [t[0] for t in texts]
    assert {r["response_a"] for r in rows} == {"9"} and {r["response_b"] for r in rows} == {"7"}
    assert set(Counter(r["winner"] for r in rows)) == {"a", "b", "tie"}
    assert (summary["name_a"], summary["name_b"], summary["reward"]) == ("nines", "sevens", "toy")

    judged, verdict = (out / "per_prompt.jsonl").read_bytes(), (out / "summary.json").read_bytes()
    proc = evaluate(setup, out, "--model-b", setup["seven"], "--name-b", "sevens")
    assert "8 prompts: 8 judged before, 0 to go" in proc.stdout
    assert (out / "per_prompt.jsonl").read_bytes() == judged and (out / "summary.json").read_bytes() == verdict


def test_eval_model_vs_stored_responses(setup, tmp_path):
    prompts = prompt_records(read_records(setup["eval_prompts"]))
    stored = []
    for i, (pid, messages) in enumerate(prompts):
        question = messages[0]["content"]
        nums = [int(n) for n in re.findall(r"\d+", question)]
        answer = [str(max(nums)), str(min(nums)), f"The answer is {max(nums)}.", "no idea"][i % 4]
        stored.append({"prompt": question, "response": answer})
    stored[1] = {"prompt": prompts[1][1], "response": stored[1]["response"]}  # a message list
    stored[2] = {"prompt_id": prompts[2][0], "response": stored[2]["response"]}  # keyed by id only
    other = {"prompt": "What is the largest number among 1, 2, 3?", "response": "3"}  # not an eval prompt
    path = write_jsonl(tmp_path / "answers.jsonl", [other] + stored[::-1])

    out = tmp_path / "stored"
    evaluate(setup, out, "--responses-b", path, "--name-b", "stored", "--tie-eps", 0.2)
    rows, summary = check_verdicts(out, prompts, 0.2)
    assert [r["response_b"] for r in rows] == [s["response"] for s in stored]
    assert sorted({r["score_b"] for r in rows}) == [0.0, 0.1, 0.5, 1.0]
    assert summary["ties"] > 0 and summary["losses"] > 0

    # a prompt without a stored response, a row without a response: errors that say so, before any model runs
    write_jsonl(path, stored[1:])
    proc = evaluate(setup, tmp_path / "missing", "--responses-b", path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"no stored response for 1 prompts (e.g. {prompts[0][0]})" in proc.stderr
    write_jsonl(path, stored[:3] + [{"prompt": stored[3]["prompt"], "answer": "7"}] + stored[4:])
    proc = evaluate(setup, tmp_path / "no_response", "--responses-b", path, check=False)
    assert proc.returncode != 0 and f"error: {path}:4: no `response` string in the row" in proc.stderr


def test_ungradable_prompt_fails_before_sampling(setup, tmp_path):
    """--reward toy on a prompt it cannot grade (no numbers): both scripts stop with one line naming the prompt's
    file:line before any prompt is sampled or anything written (it used to fail after a sampled batch, with
    `max() arg is an empty sequence`). Bad sampling flags fail the same way, in flag words."""
    rows = [{"prompt": toy.make_prompt(random.Random(i), high=9)[0][0]["content"]} for i in range(4)]
    rows[2] = {"prompt": "Tell me a joke."}
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    expected = f"error: {prompts}:3: the toy reward cannot grade this prompt: its last user message has no numbers"
    runs = {"gen": gen(setup, tmp_path / "gen", "--prompts", prompts, "--reward", "toy", check=False),
            "eval": evaluate(setup, tmp_path / "eval", "--model-b", setup["seven"], "--prompts", prompts, check=False)}
    for name, proc in runs.items():
        assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == expected, (name, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and "to sample" not in proc.stdout and "to go" not in proc.stdout
        assert not (tmp_path / name).exists()  # nothing sampled, nothing written
    proc = gen(setup, tmp_path / "top_p", "--reward", "toy", "--top-p", 0, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == \
        "error: need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1, got 0.8, 0, 0.0"
