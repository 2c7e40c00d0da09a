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
import shutil
import statistics
import subprocess
import threading
from types import SimpleNamespace

import pytest
import torch

from nanoalign import toy
from nanoalign.chat import load_chat
from nanoalign.data import prompt_records, read_records
from nanoalign.model import CausalLM, ModelConfig, load_model, save_model
from nanoalign.preferences import length_controlled, win_rate
from nanoalign.engine import generate_texts
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
    return run_script("gen_synthetic.py", "--model", setup["policy"], "--prompts", setup["prompts"], "--num-samples", N,
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


def check_pairs(out, keep_truncated):
    """pairs.jsonl = each prompt's (best, worst) above the gap, among finished samples only unless --keep-truncated;
    each pair says whether its answers finished; summary.json counts what was left out."""
    rows = read_rows(out / "samples.jsonl")
    pairs = read_rows(out / "pairs.jsonl")
    by_prompt = groups(rows)
    usable = {pid: [r for r in group if keep_truncated or r["finished"]] for pid, group in by_prompt.items()}
    expected = {}
    for pid, group in usable.items():
        if group and max(r["score"] for r in group) - min(r["score"] for r in group) >= 0.5:
            expected[pid] = (max(r["score"] for r in group), min(r["score"] for r in group))
    assert [p["prompt_id"] for p in pairs] == list(expected)
    for p in pairs:
        group = usable[p["prompt_id"]]
        assert (p["score_chosen"], p["score_rejected"]) == expected[p["prompt_id"]]
        for side in ("chosen", "rejected"):
            (sample,) = {(r["response"], r["finished"], r["n_tokens"]) for r in group
                         if r["score"] == p[f"score_{side}"] and r["response"] == p[side]}
            assert p[f"{side}_finished"] is sample[1]
            assert p[f"{side}_tokens"] == sample[2] - sample[1]  # the answer's length: its stop token not counted
        assert p["prompt"] == group[0]["prompt"]

    summary = json.loads((out / "summary.json").read_text())
    assert summary == dict(prompts=8, samples=8 * N, pairs=len(pairs),
                           unusable_samples=0 if keep_truncated else sum(not r["finished"] for r in rows),
                           prompts_below_gap=8 - len(pairs), skipped=0,
                           mean_score=pytest.approx(sum(r["score"] for r in rows) / len(rows)),
                           truncated=sum(not r["finished"] for r in rows),
                           empty=sum(not r["response"].strip() for r in rows),
                           pair_lengths=pair_lengths_of(pairs))
    return pairs


def pair_lengths_of(pairs):
    """summary.json's pair_lengths, worked out from pairs.jsonl."""
    if not pairs:
        return dict.fromkeys(["mean_chosen_tokens", "mean_rejected_tokens", "chosen_longer_share",
                              "median_delta_tokens"])
    chosen, rejected = [p["chosen_tokens"] for p in pairs], [p["rejected_tokens"] for p in pairs]
    return dict(mean_chosen_tokens=pytest.approx(statistics.mean(chosen)),
                mean_rejected_tokens=pytest.approx(statistics.mean(rejected)),
                chosen_longer_share=sum(c > r for c, r in zip(chosen, rejected)) / len(pairs),
                median_delta_tokens=statistics.median(c - r for c, r in zip(chosen, rejected)))


def test_pairs_are_best_and_worst_above_the_gap(setup, toy_run, tmp_path):
    """By default an answer cut at --max-new-tokens is never in a pair; --keep-truncated lets it in, marked
    unfinished (rebuilt from the same samples: a finished run only rebuilds its pairs)."""
    pairs = check_pairs(toy_run, keep_truncated=False)
    assert 0 < len(pairs) < 8, "the run should keep some prompts and drop others"
    assert all(p["chosen_finished"] and p["rejected_finished"] for p in pairs)
    # the same samples with the first pair's chosen answer marked cut: left out by default, in with --keep-truncated
    out = tmp_path / "cut"
    shutil.copytree(toy_run, out)
    rows = read_rows(out / "samples.jsonl")
    cut = next(r for r in rows if r["prompt_id"] == pairs[0]["prompt_id"] and r["response"] == pairs[0]["chosen"])
    cut["finished"] = False
    write_jsonl(out / "samples.jsonl", rows)
    assert "0 to sample" in gen(setup, out, *TOY_ARGS).stdout
    assert all(p["chosen_finished"] and p["rejected_finished"] for p in check_pairs(out, keep_truncated=False))
    gen(setup, out, *TOY_ARGS, "--keep-truncated")
    pairs = check_pairs(out, keep_truncated=True)
    assert pairs[0]["chosen"] == cut["response"] and pairs[0]["chosen_finished"] is False


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
    shutil.copy(toy_run / "run_settings.json", out)  # written at the start of the killed run
    (out / "samples.jsonl").write_bytes(b"".join(lines[:3 * N + 2]) + lines[3 * N + 2][:25])
    proc = gen(setup, out, *TOY_ARGS)
    assert "8 prompts: 3 done before, 5 to sample" in proc.stdout
    assert (out / "samples.jsonl").read_bytes() == full
    check_complete(read_rows(out / "samples.jsonl"), prompt_records(read_records(setup["prompts"])))
    assert (out / "pairs.jsonl").read_bytes() == (toy_run / "pairs.jsonl").read_bytes()
    assert not (out / "samples.tmp").exists()


def test_a_score_on_disk_that_is_no_score_is_redone(setup, toy_run, tmp_path):
    """A bare NaN in samples.jsonl (an older run took it from its reward cache) is not a result: its prompt is
    sampled and scored again (it used to count as done, and every rerun crashed writing the summary)."""
    out = tmp_path / "nan"
    shutil.copytree(toy_run, out)
    lines = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    score = json.dumps(json.loads(lines[4])["score"])
    lines[4] = lines[4].replace(f'"score": {score},', '"score": NaN,')
    (out / "samples.jsonl").write_text("".join(lines))
    proc = gen(setup, out, *TOY_ARGS)
    assert "8 prompts: 7 done before, 1 to sample" in proc.stdout
    for name in ("samples.jsonl", "pairs.jsonl", "summary.json"):
        assert (out / name).read_bytes() == (toy_run / name).read_bytes(), name

def test_a_rerun_with_other_settings(setup, toy_run, tmp_path):
    """Another --num-samples stops with one line and touches nothing (it used to rewrite samples.jsonl to 0 rows);
    --min-gap only rebuilds the pairs, so it may change; --overwrite moves the earlier run aside and starts fresh."""
    out = tmp_path / "rerun"
    shutil.copytree(toy_run, out)
    samples = (out / "samples.jsonl").read_bytes()
    proc = gen(setup, out, *TOY_ARGS, "--num-samples", 2, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"error: {out} holds a run with other settings: --num-samples 2 (was 3); use another --out, or --overwrite to move its "
        f"results to {out}/replaced-<time>/ and start fresh")
    assert (out / "samples.jsonl").read_bytes() == samples

    proc = gen(setup, out, *TOY_ARGS, "--min-gap", 0.9)
    assert "8 prompts: 8 done before, 0 to sample" in proc.stdout and (out / "samples.jsonl").read_bytes() == samples

    proc = gen(setup, out, *TOY_ARGS, "--num-samples", 2, "--overwrite")
    assert "8 prompts: 0 done before, 8 to sample" in proc.stdout
    (backup,) = out.glob("replaced-*")
    assert (backup / "samples.jsonl").read_bytes() == samples
    prompt_ids = groups(read_rows(backup / "samples.jsonl"))
    assert Counter(r["prompt_id"] for r in read_rows(out / "samples.jsonl")) == {pid: 2 for pid in prompt_ids}


def test_a_rerun_with_fewer_prompts_on_a_hurt_out_dir(setup, toy_run, tmp_path):
    """A rerun with a smaller --max-prompts builds pairs.jsonl and summary.json from its own prompts (they held every
    prompt's pairs found on disk) and keeps the other samples for a later, larger run. The dir is hurt too: the last
    row torn inside a UTF-8 character (it stopped the rerun with UnicodeDecodeError), a row of valid JSON without its
    score (dropped with one line: its prompt is not done any more), and a killed write's temporary file (removed)."""
    out = tmp_path / "fewer"
    shutil.copytree(toy_run, out)
    rows = read_rows(out / "samples.jsonl")
    line = 6 * N + 2  # sample 1 of the 7th prompt, past --max-prompts 1 (the 2nd prompt has toy_run's only pair)
    damaged = {k: v for k, v in rows[line - 1].items() if k != "score"}
    write_jsonl(out / "samples.jsonl", rows[:line - 1] + [damaged] + rows[line:])
    with open(out / "samples.jsonl", "ab") as f:
        f.write('{"prompt_id": "x", "response": "é'.encode()[:-1])
    dead = subprocess.Popen(["sleep", "60"])
    dead.kill()
    dead.wait()
    (out / f".pairs.jsonl.tmp{dead.pid}").write_bytes(b"half a file")
    proc = gen(setup, out, *TOY_ARGS, "--max-prompts", 1)
    assert proc.stdout.splitlines()[:3] == [
        f"removed 1 temporary file (11 bytes) that killed runs left in {out}",
        f"{out / 'samples.jsonl'}:{line}: no field 'score': dropped 1 damaged row (line {line}); their work is redone",
        "1 prompts: 1 done before, 0 to sample"]
    first = {pid for pid, _ in prompt_records(read_records(setup["prompts"]))[:1]}
    pairs = [p for p in read_rows(toy_run / "pairs.jsonl") if p["prompt_id"] in first]
    assert read_rows(out / "pairs.jsonl") == pairs and len(pairs) < len(read_rows(toy_run / "pairs.jsonl"))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["prompts"], summary["samples"], summary["pairs"]) == (1, N, len(pairs))
    by_key = lambda r: (r["prompt_id"], r["sample"])  # noqa: E731
    kept = sorted(read_rows(out / "samples.jsonl"), key=by_key)
    assert kept == sorted(rows[:line - 1] + rows[line:], key=by_key)  # every row kept but the damaged one
    assert not list(out.glob(".*.tmp*"))


def test_two_ranks_resume_a_one_process_run_with_the_same_files(setup, toy_run, tmp_path):
    """torchrun, 2 gloo ranks and another --batch-size, resuming a 1-process run killed mid-prompt: each rank
    samples its share into its own part, rank 0 merges, and every file is byte for byte the uninterrupted run's."""
    lines = (toy_run / "samples.jsonl").read_bytes().splitlines(keepends=True)
    out = tmp_path / "ranks"
    out.mkdir()
    shutil.copy(toy_run / "run_settings.json", out)  # written at the start of the killed run
    (out / "samples.jsonl").write_bytes(b"".join(lines[:2 * N + 1]) + lines[2 * N + 1][:25])
    proc = run_script("gen_synthetic.py", "--model", setup["policy"], "--prompts", setup["prompts"],
                      "--num-samples", N, "--out", out, *CPU, "--reward", "toy", "--min-gap", 0.5, "--batch-size", 2,
                      nproc=2)
    assert "8 prompts: 2 done before, 6 to sample on 2 ranks" in proc.stdout
    for name in ("samples.jsonl", "pairs.jsonl", "summary.json"):
        assert (out / name).read_bytes() == (toy_run / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir()) == [".lock", "pairs.jsonl", "report.html", "run_settings.json",
                                                     "samples.jsonl", "summary.json"]


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
    assert not (out / "samples.jsonl").exists()  # merged only at the end; rows so far are in the rank's part
    rows = read_rows(out / "samples.part0-of-1.jsonl")
    done = len(groups(rows))
    assert done in (2, 4), "whole batches of 2 prompts are on disk, nothing of the failed one"
    rank = {pid: i for i, (pid, _) in enumerate(prompts)}  # the part holds prompts in the order they finished
    check_complete(sorted(rows, key=lambda r: rank[r["prompt_id"]]), [p for p in prompts if p[0] in groups(rows)])
    done_keys = {(r["prompt"][-1]["content"], r["response"]) for r in rows}
    assert done_keys <= ok_1 and ok_1 - done_keys, "the failed batch had scores in the cache already"

    # run 2: the server is back; the same command finishes the job
    stub.fail_after, n_log = None, len(stub.log)
    proc = gen(setup, out, *args)
    assert f"6 prompts: {done} done before, {6 - done} to sample" in proc.stdout
    before = rows
    rows = read_rows(out / "samples.jsonl")
    assert all(r in rows for r in before) and not list(out.glob("samples.part*"))
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
# gen_synthetic.py sampling from an OpenAI-compatible completions server (--policy-url)

def completion_reply(stub, path, headers, body):
    """A vLLM-like /v1/completions: its answer is a digit and a finish reason that follow from the request's seed;
    a 500 for every request after `fail_after` successful ones."""
    with stub.lock:
        failing = stub.fail_after is not None and stub.ok >= stub.fail_after
        stub.ok += not failing
        stub.log.append((500 if failing else 200, path, body))
    if failing:
        return 500, {"error": "engine overloaded"}
    finished = body["seed"] % 3 != 0
    return 200, {"choices": [{"index": 0, "text": str(body["seed"] % 10), "logprobs": None,
                              "finish_reason": "stop" if finished else "length"}],
                 "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 2 if finished else 7,
                           "total_tokens": len(body["prompt"]) + 7}}


def test_policy_url_samples_from_a_completions_server_and_resumes(setup, tmp_path):
    from nanoalign.sampling import stream_key
    stub = SimpleNamespace(lock=threading.Lock(), log=[], ok=0, fail_after=8)
    prompts = prompt_records(read_records(setup["prompts"]), 6)
    chat = load_chat(setup["policy"])
    out = tmp_path / "served"
    with json_server(lambda *request: completion_reply(stub, *request)) as url:
        args = ("--max-prompts", 6, "--batch-size", 2, "--reward", "toy", "--policy-url", url,
                "--policy-model", "merged", "--policy-retries", 1, "--top-k", 5, "--seed", 7)
        # run 1: the server dies after 8 answers, during the second batch of 2 prompts x 3 samples
        proc = gen(setup, out, *args, check=False)
        error = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert error.startswith(f"error: policy server {url}/completions: HTTP 500") and "after 2 attempts" in error
        assert len(groups(read_rows(out / "samples.part0-of-1.jsonl"))) == 2
        stub.fail_after, n_log = None, len(stub.log)
        proc = gen(setup, out, *args)
    assert "6 prompts: 2 done before, 4 to sample" in proc.stdout
    asked = [body for status, _, body in stub.log[n_log:]]
    assert len(asked) == 4 * N - 2  # the 2 answers of the failed batch came from the cache
    rows = read_rows(out / "samples.jsonl")
    check_complete(rows, prompts)
    ids = {pid: chat.render_prompt(messages) for pid, messages in prompts}
    for r in rows:
        seed = stream_key(7, (r["prompt_id"], r["sample"]))[0]  # sample k of prompt p: the server's draw `seed`
        assert (r["response"], r["finished"], r["n_tokens"]) == (str(seed % 10), seed % 3 != 0, 2 if seed % 3 else 7)
        assert r["score"] == toy.reward(r["prompt"], r["response"])
    assert {path for _, path, _ in stub.log} == {"/v1/completions"}
    bodies = {(tuple(b["prompt"]), b["seed"]): b for _, _, b in stub.log}
    assert {(tuple(ids[r["prompt_id"]]), stream_key(7, (r["prompt_id"], r["sample"]))[0]) for r in rows} == set(bodies)
    for b in bodies.values():  # our chat template's ids, both Qwen stop ids, the run's settings
        assert (b["model"], b["max_tokens"], b["temperature"], b["top_p"], b["top_k"], b["n"]) == \
            ("merged", 2, 0.8, 0.95, 5, 1)
        assert b["stop_token_ids"] == list(chat.stop_ids) and tuple(b["prompt"]) in {tuple(v) for v in ids.values()}


# -----------------------------------------------------------------------------
# eval_winrate.py

def evaluate(setup, out, *args, check=True, nproc=1):
    return run_script("eval_winrate.py", "--model-a", setup["policy"], "--name-a", "nines",
                      "--prompts", setup["eval_prompts"], "--reward", "toy", "--batch-size", 3, "--out", out,
                      *CPU, *args, check=check, nproc=nproc)


def check_verdicts(setup, out, prompts, tie_eps, served_a=False, stored_b=False):
    """per_prompt.jsonl rows scored by the toy reward, winners by the scores, each answer's length in tokens and
    whether it finished; summary = win_rate and length_controlled of them, and each side's lengths."""
    rows = read_rows(out / "per_prompt.jsonl")
    chat = load_chat(setup["policy"])
    assert [r["prompt_id"] for r in rows] == [pid for pid, _ in prompts]
    for r, (_, messages) in zip(rows, prompts):
        assert r["prompt"] == messages
        assert r["score_a"] == toy.reward(messages, r["response_a"])
        assert r["score_b"] == toy.reward(messages, r["response_b"])
        d = r["score_a"] - r["score_b"]
        assert r["winner"] == ("a" if d > tie_eps else "b" if d < -tie_eps else "tie")
        for side in "ab":
            tokens, finished = r[f"tokens_{side}"], r[f"finished_{side}"]
            if side == "a" and served_a:  # the completions stub: usage.completion_tokens 2 (stopped) or 7 (cut)
                assert tokens == (1 if finished else 7)
            else:  # sampled here (--max-new-tokens 2: a 2-token answer was cut), or stored (ending unknown)
                assert tokens == len(chat.encode(r[f"response_{side}"]))
                assert finished is (None if side == "b" and stored_b else tokens < 2)
    summary = json.loads((out / "summary.json").read_text())
    expected = win_rate([r["score_a"] for r in rows], [r["score_b"] for r in rows], tie_eps)
    expected.update(length_controlled([r["winner"] for r in rows], [r["tokens_a"] - r["tokens_b"] for r in rows]))
    for k, v in expected.items():
        assert summary[k] == (v if v is None else pytest.approx(v)), k
    assert summary["bootstrap"] == {"resamples": 1000, "seed": 0}
    for side in "ab":
        tokens = [r[f"tokens_{side}"] for r in rows]
        finished = [r[f"finished_{side}"] for r in rows]
        assert summary["lengths"][side] == dict(
            mean_tokens=pytest.approx(sum(tokens) / len(rows)), median_tokens=statistics.median(tokens),
            empty_share=sum(not r[f"response_{side}"].strip() for r in rows) / len(rows),
            truncated_share=None if None in finished else finished.count(False) / len(rows))
    return rows, summary


def test_eval_model_vs_model_and_rerun(setup, tmp_path):
    out = tmp_path / "ab"
    prompts = prompt_records(read_records(setup["eval_prompts"]))
    proc = evaluate(setup, out, "--model-b", setup["seven"], "--name-b", "sevens")
    assert "8 prompts: 0 judged before, 8 to go" in proc.stdout
    rows, summary = check_verdicts(setup, out, prompts, 0.0)
    # greedy answers, the same as sampling each model here
    chat = load_chat(setup["policy"])
    conversations = [m for _, m in prompts]
    for side, model_dir in (("a", setup["policy"]), ("b", setup["seven"])):
        texts = generate_texts(load_model(model_dir), chat, conversations, 2, temperature=0.0)
        assert [r[f"response_{side}"] for r in rows] == [t[0] for t in texts]
    assert {r["response_a"] for r in rows} == {"9"} and {r["response_b"] for r in rows} == {"7"}
    assert set(Counter(r["winner"] for r in rows)) == {"a", "b", "tie"}
    assert (summary["name_a"], summary["name_b"], summary["reward"]) == ("nines", "sevens", "toy")
    assert summary["models"] == dict(a=dict(model=str(setup["policy"]), adapters=[], policy_url=None),
                                     b=dict(model=str(setup["seven"]), adapters=[], policy_url=None, responses=None))
    assert summary["lengths"]["a"] == dict(mean_tokens=1.0, median_tokens=1.0, empty_share=0.0, truncated_share=0.0)

    judged, verdict = (out / "per_prompt.jsonl").read_bytes(), (out / "summary.json").read_bytes()
    proc = evaluate(setup, out, "--model-b", setup["seven"], "--name-b", "sevens")
    assert "8 prompts: 8 judged before, 0 to go" in proc.stdout
    assert (out / "per_prompt.jsonl").read_bytes() == judged and (out / "summary.json").read_bytes() == verdict
    # a row of valid JSON without a verdict (another schema, or damaged): named, judged again, the same files (it
    # counted as judged, then stopped the summary with a KeyError)
    damaged = {k: v for k, v in rows[2].items() if k != "winner"}
    write_jsonl(out / "per_prompt.jsonl", rows[:2] + [damaged] + rows[3:])
    proc = evaluate(setup, out, "--model-b", setup["seven"], "--name-b", "sevens")
    assert "8 prompts: 7 judged before, 1 to go" in proc.stdout
    assert (f"{out / 'per_prompt.jsonl'}:3: no field 'winner': dropped 1 damaged row (line 3); their work is "
            f"redone") in proc.stdout.splitlines()
    assert (out / "per_prompt.jsonl").read_bytes() == judged and (out / "summary.json").read_bytes() == verdict
    # another model B into the same --out: its verdicts would be the old model's; it stops, naming the flag
    proc = evaluate(setup, out, "--model-b", setup["policy"], "--name-b", "sevens", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"--model-b {str(setup['policy'])!r} (was {str(setup['seven'])!r})" in proc.stderr.splitlines()[-1]
    assert (out / "per_prompt.jsonl").read_bytes() == judged and (out / "summary.json").read_bytes() == verdict

    # 2 gloo ranks, sampled at temperature 1 (keyed by prompt): the same verdicts as one process
    sampled = ("--model-b", setup["seven"], "--name-b", "sevens", "--temperature", 1.0)
    evaluate(setup, tmp_path / "one", *sampled)
    proc = evaluate(setup, tmp_path / "two", *sampled, "--batch-size", 2, nproc=2)
    assert "8 prompts: 0 judged before, 8 to go on 2 ranks" in proc.stdout
    for name in ("per_prompt.jsonl", "summary.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    rows, _ = check_verdicts(setup, tmp_path / "one", prompts, 0.0)
    assert len({r["response_a"] for r in rows}) > 2  # really sampled
    assert {r["finished_a"] for r in rows} | {r["finished_b"] for r in rows} == {True, False}  # some were cut


def test_eval_policy_url_against_a_local_model(setup, tmp_path):
    from nanoalign.sampling import stream_key
    stub = SimpleNamespace(lock=threading.Lock(), log=[], ok=0, fail_after=None)
    prompts = prompt_records(read_records(setup["eval_prompts"]))
    with json_server(lambda *request: completion_reply(stub, *request)) as url:
        evaluate(setup, tmp_path / "served", "--policy-url-a", url, "--model-b", setup["seven"], "--name-b", "sevens",
                 "--seed", 3)
    rows, _ = check_verdicts(setup, tmp_path / "served", prompts, 0.0, served_a=True)
    assert [r["response_a"] for r in rows] == [str(stream_key(3, pid)[0] % 10) for pid, _ in prompts]
    assert {r["response_b"] for r in rows} == {"7"} and len(stub.log) == len(prompts)
    assert {b["temperature"] for _, _, b in stub.log} == {0.0} and {b["model"] for _, _, b in stub.log} == \
        {str(setup["policy"])}


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
    proc = evaluate(setup, out, "--responses-b", path, "--name-b", "stored", "--tie-eps", 0.2)
    rows, summary = check_verdicts(setup, out, prompts, 0.2, stored_b=True)
    assert [r["response_b"] for r in rows] == [s["response"] for s in stored]
    assert sorted({r["score_b"] for r in rows}) == [0.0, 0.1, 0.5, 1.0]
    assert summary["ties"] > 0 and summary["losses"] > 0
    assert summary["lengths"]["b"]["truncated_share"] is None and summary["models"]["b"]["responses"] == str(path)
    # the printed table: counts, both rates with their intervals, each side's lengths, in 100 columns
    printed = proc.stdout[proc.stdout.index("nines vs stored:"):].splitlines()
    assert printed[0].startswith(f"nines vs stored: {summary['wins']}W/{summary['losses']}L/{summary['ties']}T of 8;")
    assert printed[2].split()[:3] == ["win", "rate", f"{summary['win_rate']:.3f}"]
    assert printed[3].split() == ["length-controlled", f"{summary['lc_win_rate']:.3f}",
                                  *(f"[{summary['lc_ci95'][0]:.3f},", f"{summary['lc_ci95'][1]:.3f}]")]
    assert printed[6].split() == ["stored", f"{summary['lengths']['b']['mean_tokens']:.1f}",
                                  f"{summary['lengths']['b']['median_tokens']:g}", "0.0%", "n/a"]
    assert len(printed) == 8 and max(map(len, printed[:7])) <= 100
    assert printed[7] == f"report: {out / 'report.html'}"  # then the page (nanoalign/pages.py)

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
        # nothing sampled, nothing written: only the dir's lock and the settings (which bind no later run)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == [".lock", "run_settings.json"]
    proc = gen(setup, tmp_path / "top_p", "--reward", "toy", "--top-p", 0, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(
        "error: argument --top-p: must be a number in (0, 1], got '0'"), proc.stderr
    assert not (tmp_path / "top_p").exists()


# -----------------------------------------------------------------------------
# Scoring call sites: exact ties, refused items, valid summaries

def strict_json(path):
    """JSON as the spec has it: a NaN or Infinity token is an error (Python's json.loads would accept it)."""
    return json.loads(path.read_text(), parse_constant=lambda token: pytest.fail(f"{path}: {token} is not JSON"))


def test_identical_answers_are_exact_ties_with_a_local_reward_model(setup, tmp_path):
    """Stored B answers equal to A's greedy answer on half the prompts, long different ones on the others, judged
    by a tiny random reward model in fp32 with --tie-eps 0: every identical pair is a tie (A and B used to be
    scored in separate calls with different batch neighbours, which made wins and losses out of identical text)."""
    from tests.test_reward import make_seqcls_dir
    rm_dir = make_seqcls_dir(tmp_path / "rm", toy.build_tokenizer(tmp_path / "tok"), "qwen2")
    prompts = prompt_records(read_records(setup["eval_prompts"]))
    stored = [{"prompt_id": pid, "response": "9" if i % 2 else f"The largest of them all is {i} " * (i + 1)}
              for i, (pid, _) in enumerate(prompts)]
    path = write_jsonl(tmp_path / "answers.jsonl", stored)
    out = tmp_path / "ties"
    evaluate(setup, out, "--responses-b", path, "--reward", rm_dir, "--reward-batch-size", 4)
    rows = read_rows(out / "per_prompt.jsonl")
    assert {r["response_a"] for r in rows} == {"9"}
    same = [r for r in rows if r["response_a"] == r["response_b"]]
    assert len(same) == 4 and all(r["winner"] == "tie" and r["score_a"] == r["score_b"] for r in same)
    assert all(r["winner"] != "tie" for r in rows if r not in same)
    summary = strict_json(out / "summary.json")
    assert summary["ties"] == 4 and summary["skipped"] == 0

    # all ties: nothing decided, so no win rate: null, the whole interval, and valid JSON
    write_jsonl(path, [{"prompt_id": pid, "response": "9"} for pid, _ in prompts])
    evaluate(setup, tmp_path / "all_ties", "--responses-b", path)
    summary = strict_json(tmp_path / "all_ties" / "summary.json")
    assert (summary["ties"], summary["win_rate"], summary["ci95"]) == (8, None, [0.0, 1.0])


def test_refused_items_are_skipped_and_counted(setup, tmp_path):
    """An endpoint that answers HTTP 400 for some answers: the run finishes, those samples keep score null and
    are in no pair, summary.json counts them; a rerun asks nothing again."""
    log = []

    def respond(path, headers, body):
        question, response = body["messages"][-2]["content"], body["messages"][-1]["content"]
        log.append(response)
        if response == "8":
            return 400, {"error": "input too long"}
        return 200, {"choices": [{"message": {"content": f"reward:{stub_score(question, response)}"}}]}

    with json_server(respond) as url:
        out = tmp_path / "refused"
        args = ("--max-prompts", 4, "--batch-size", 2, "--reward", url, "--reward-retries", 0)
        gen(setup, out, *args)
        rows = read_rows(out / "samples.jsonl")
        refused = [r for r in rows if r["response"] == "8"]
        assert refused and all(r["score"] is None for r in refused)
        assert all(r["score"] == stub_score(r["prompt"][-1]["content"], r["response"]) for r in rows
                   if r["response"] != "8")
        summary = strict_json(out / "summary.json")
        assert summary["skipped"] == len(refused) and summary["samples"] == len(rows) == 4 * N
        assert all("8" not in (p["chosen"], p["rejected"]) for p in read_rows(out / "pairs.jsonl"))
        asked = len(log)
        (out / "samples.jsonl").write_text("")  # sample everything again: every score, refusals too, is cached
        gen(setup, out, *args)
        assert len(log) == asked and strict_json(out / "summary.json") == summary
