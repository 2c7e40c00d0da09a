"""train_dpo.py end to end, run as a user runs it (python / torchrun, gloo on CPU) on the tiny toy task: the step-0
invariant (policy == reference, loss ln 2), DPO learns the toy preferences, DDP and accumulation give the same
adapter, precomputed reference log-probs give the same run and are recomputed when stale, a second round stacks on
the first and merges into a plain HF dir, the loss variants run, bad data fails with the file and line."""
import hashlib
import json
import math
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from nanoalign import toy
from nanoalign.chat import load_chat
from nanoalign.data import (holdout_and_mix, packed_preference_batch, preference_examples, read_records,
                            step_batches)
from nanoalign.lora import adapters_disabled, load_adapter, load_merged
from nanoalign.model import load_model, save_model
from tests.fixtures import (cached_toy_setup, check_stopped_on_nan, max_weight_diff, read_metrics, read_weights,
                            run_script, write_jsonl)

SCRIPT = "train_dpo.py"
FP32 = ("--device", "cpu", "--precision", "fp32")
LN2 = math.log(2)
BETA = 0.1  # the script's default
N_PAIRS, N_EVAL = 352, 256  # the learning run trains on 96 pairs and measures its held-out accuracy on 256
# the runs that check DDP, accumulation and the precomputed reference: 3 steps, 19 held-out pairs (odd, so two
# ranks evaluate 10 and 9 of them: the eval metrics must still be those of one process over all 19)
SMALL_EVAL = 0.054  # round(0.054 * 352) = 19
SMALL = ("--max-steps", 3, "--lr", 2e-3, "--eval-frac", SMALL_EVAL)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The toy tokenizer, a stand-in "SFT model" and 352 toy preference pairs (chosen = the largest number).

    The model is the random toy base with its (tied) embedding scaled from std 0.02 to 1: at 0.02 the lm_head's
    logits after the final RMSNorm span about +-1 nat whatever an adapter does, so no run opens a clear margin.
    With the other weights small, what LoRA learns (mostly "prefer the larger leading digit", which decides 80% of
    the toy pairs) carries over to held-out prompts: 0.72-0.76 held-out accuracy over data and run seeds.
    """
    toy_setup = cached_toy_setup(tmp_path_factory)
    root = tmp_path_factory.mktemp("dpo")
    model = load_model(toy_setup.model)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(50.0)
    model_dir = save_model(model, root / "sft", tokenizer_from=toy_setup.tokenizer)
    rng = random.Random(1)
    prefs = write_jsonl(root / "prefs.jsonl", [toy.preference_pair(rng) for _ in range(N_PAIRS)])
    return SimpleNamespace(model=model_dir, prefs=prefs, chat=load_chat(model_dir))


def dpo(setup, out, *args, nproc=1, check=True):
    """Run train_dpo.py on the toy pairs; returns the CompletedProcess."""
    return run_script(SCRIPT, "--model", setup.model, "--data", setup.prefs, "--out", out, *FP32,
                      "--save-every", 0, *args, nproc=nproc, check=check)


def splits(setup, eval_frac, seed=0, prefs=None):
    """The script's train / eval pairs, rebuilt here with the data functions (default max lengths)."""
    examples, _ = preference_examples(read_records(prefs or setup.prefs), setup.chat, 1024, 512)
    return holdout_and_mix([examples], [1.0], eval_frac, seed)


def first_batch(setup, batch_size, eval_frac, seed=0, prefs=None):
    train_set, _ = splits(setup, eval_frac, seed, prefs)
    lengths = [len(ex["prompt"]) + max(len(ex["chosen"]), len(ex["rejected"])) for ex in train_set]
    (idx,) = next(step_batches(lengths, batch_size, 1, 0, 1, seed))
    return [train_set[i] for i in idx]


@torch.no_grad()
def plain_logps(model, pairs, batch_size=64):
    """[n, 2] summed log-probs of (chosen, rejected) given the prompt, from full logits: no nanoalign.losses."""
    out = []
    for field in ("chosen", "rejected"):
        col = []
        for s in range(0, len(pairs), batch_size):
            part = pairs[s:s + batch_size]
            seqs = [ex["prompt"] + ex[field] for ex in part]
            ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)  # right padding: causal, no mask
            for i, seq in enumerate(seqs):
                ids[i, :len(seq)] = torch.tensor(seq)
            logp = F.log_softmax(model(ids)[:, :-1].double(), dim=-1).gather(2, ids[:, 1:, None])[..., 0]  # [b, t-1]
            for i, ex in enumerate(part):  # targets from the first response token to the last
                col.append(logp[i, len(ex["prompt"]) - 1:len(seqs[i]) - 1].sum().item())
        out.append(col)
    return torch.tensor(out, dtype=torch.float64).T


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def lora_b_max(adapter_dir):
    return max(t.abs().max().item() for k, t in read_weights(adapter_dir).items() if "lora_B" in k)


def last_line(text):
    return [line for line in text.splitlines() if line.strip()][-1]


# -----------------------------------------------------------------------------
# one learning run (also round 1 of the stacking test) and a few 3-step runs, shared by the tests below

@pytest.fixture(scope="module")
def learned(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("learned") / "out"
    eval_frac = N_EVAL / N_PAIRS
    dpo(setup, out, "--max-steps", 60, "--lr", 1e-2, "--batch-size", 8, "--eval-frac", eval_frac, "--eval-every", 0)
    return SimpleNamespace(out=out, rows=read_metrics(out), eval_frac=eval_frac, batch_size=8)


@pytest.fixture(scope="module")
def small(setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    dpo(setup, root / "big", *SMALL, "--batch-size", 4)
    return root


def test_step0_policy_is_reference(setup, learned):
    """B = 0 at step 0, so policy == reference: loss exactly ln 2, rewards 0, and the logged log-probs are those
    of the first batch under the model (recomputed here from plain logits)."""
    first = learned.rows[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(LN2, abs=1e-6)
    for k in ("chosen_reward", "rejected_reward", "reward_margin", "reward_acc"):  # ties count as wrong
        assert first[k] == 0.0, k
    logps = plain_logps(load_model(setup.model).eval(), first_batch(setup, learned.batch_size, learned.eval_frac))
    assert first["chosen_logps"] == pytest.approx(logps[:, 0].mean().item(), abs=1e-4)
    assert first["rejected_logps"] == pytest.approx(logps[:, 1].mean().item(), abs=1e-4)


def test_dpo_learns_the_preferences(setup, learned):
    rows = learned.rows
    assert [r["step"] for r in rows] == list(range(1, 61))
    last10 = {k: sum(r[k] for r in rows[-10:]) / 10 for k in ("reward_acc", "reward_margin", "loss")}
    # 96 training pairs, 5 epochs: mostly learned (0.84-0.93 seen over seeds), the margin opened (1.8-2.7)
    assert last10["reward_acc"] > 0.75, last10
    assert last10["reward_margin"] > rows[0]["reward_margin"] + 0.8, last10  # beta-scaled nats
    assert last10["loss"] < LN2 - 0.2, last10
    final = rows[-1]
    assert "eval_reward_acc" in final and all("eval_loss" not in r for r in rows[:-1])  # --eval-every 0: at the end
    # and it carries over to 256 held-out pairs (0.72-0.76 and margins 1.0-1.5 seen; 0.5 is chance)
    assert final["eval_reward_acc"] > 0.65 and final["eval_reward_margin"] > 0.5, final

    # the eval metrics = rewards of the held-out pairs under final adapter vs the model, recomputed with plain logits
    _, eval_set = splits(setup, learned.eval_frac)
    assert len(eval_set) == N_EVAL
    model = load_model(setup.model).eval()
    load_adapter(model, learned.out / "final", name="default")
    policy = plain_logps(model, eval_set)
    with adapters_disabled(model):
        ref = plain_logps(model, eval_set)
    rewards = BETA * (policy - ref)  # [n, 2] chosen, rejected
    losses = -F.logsigmoid(rewards[:, 0] - rewards[:, 1])
    assert final["eval_reward_acc"] == pytest.approx((rewards[:, 0] > rewards[:, 1]).double().mean().item(), abs=1e-6)
    assert final["eval_reward_margin"] == pytest.approx((rewards[:, 0] - rewards[:, 1]).mean().item(), abs=1e-4)
    assert final["eval_loss"] == pytest.approx(losses.mean().item(), abs=1e-4)
    assert final["eval_chosen_logps"] == pytest.approx(policy[:, 0].mean().item(), abs=1e-4)


def test_ddp_and_accumulation_match_one_big_batch(setup, small, tmp_path):
    """Only the LoRA parameters are trainable (DDP registers only those): 2 ranks x 2 pairs and 1 rank x 2 pairs x 2
    accumulation steps make the same 3 updates as 1 rank x 4 pairs."""
    dpo(setup, tmp_path / "ddp", *SMALL, "--batch-size", 2, nproc=2)
    dpo(setup, tmp_path / "accum", *SMALL, "--batch-size", 2, "--grad-accum", 2)
    big = read_metrics(small / "big")
    assert [r["step"] for r in big] == [1, 2, 3]
    for name in ("ddp", "accum"):
        rows = read_metrics(tmp_path / name)
        assert len(rows) == 3, name
        for r, r_big in zip(rows, big):
            for k in ("loss", "reward_acc", "reward_margin", "chosen_logps", "rejected_logps", "grad_norm"):
                assert r[k] == pytest.approx(r_big[k], rel=1e-6, abs=1e-5), (name, r["step"], k)  # logps ~ -100
        for k in ("eval_loss", "eval_reward_acc", "eval_reward_margin"):  # 19 eval pairs, 10 + 9 on 2 ranks
            assert rows[-1][k] == pytest.approx(big[-1][k], abs=1e-5), (name, k)
        assert max_weight_diff(read_weights(tmp_path / name / "final"), read_weights(small / "big" / "final")) < 1e-5
    assert lora_b_max(small / "big" / "final") > 1e-3  # the adapter moved (B starts at 0), 100x the tolerance
    # the adapter dir is all that was trained: no base weights saved, only the new adapter's tensors
    assert all(".lora_A." in k or ".lora_B." in k for k in read_weights(small / "big" / "final"))


def test_packed_sequences_match_padded_rows(setup, small, tmp_path):
    """--pack: the 8 sequences of each step packed into one row each attending only to itself: the same
    metrics, eval metrics and adapter as the padded [8, t] batches (the equality of the four log-prob sums on
    several rows is tests/test_packing.py's)."""
    dpo(setup, tmp_path / "packed", *SMALL, "--batch-size", 4, "--pack")
    big, rows = read_metrics(small / "big"), read_metrics(tmp_path / "packed")
    assert len(rows) == 3
    for r, r_big in zip(rows, big):
        for k in ("loss", "reward_acc", "reward_margin", "chosen_logps", "rejected_logps", "grad_norm"):
            assert r[k] == pytest.approx(r_big[k], rel=1e-6, abs=1e-5), (r["step"], k)
    assert rows[-1]["eval_loss"] == pytest.approx(big[-1]["eval_loss"], abs=1e-5)
    assert max_weight_diff(read_weights(tmp_path / "packed" / "final"), read_weights(small / "big" / "final")) < 1e-5


def used_pairs(setup, steps, global_batch, eval_frac=SMALL_EVAL):
    """The pairs a run of `steps` steps sees (its global batches, cut by the data functions) plus the eval split."""
    train_set, eval_set = splits(setup, eval_frac)
    lengths = [len(ex["prompt"]) + max(len(ex["chosen"]), len(ex["rejected"])) for ex in train_set]
    batches = step_batches(lengths, global_batch, 1, 0, 1, 0)
    return [train_set[i] for _ in range(steps) for i in next(batches)[0]] + eval_set


def pair_keys(pairs):
    return [hashlib.sha1(json.dumps([ex["prompt"], ex["chosen"], ex["rejected"]]).encode()).hexdigest() for ex in pairs]


def test_precomputed_reference(setup, small, tmp_path):
    """--precompute-ref: the same run as the in-loop reference; only the pairs the run uses are computed (its steps x
    the global batch, plus the eval split); a later, longer run (any world size) reuses the file and computes only
    the pairs it adds; other settings make it stale."""
    out = tmp_path / "pre"
    # 2 ranks x 2 pairs with precomputed log-probs vs 1 rank x 4 pairs with the in-loop reference (DDP alone: above)
    proc = dpo(setup, out, *SMALL, "--batch-size", 2, "--precompute-ref", nproc=2)
    assert "reference log-probs: 31 pairs used, 31 to compute" in proc.stdout, proc.stdout  # 3 x 4 + 19 eval
    assert "reference log-probs of 31 pairs" in proc.stdout and "tokens/s" in proc.stdout
    rows, big = read_metrics(out), read_metrics(small / "big")
    assert len(rows) == 3
    for r, r_big in zip(rows, big):
        for k in ("loss", "reward_margin", "chosen_reward", "rejected_reward", "grad_norm"):
            assert r[k] == pytest.approx(r_big[k], abs=1e-5), (r["step"], k)
    for k in ("eval_loss", "eval_reward_acc", "eval_reward_margin"):
        assert rows[-1][k] == pytest.approx(big[-1][k], abs=1e-5), k
    assert max_weight_diff(read_weights(out / "final"), read_weights(small / "big" / "final")) < 1e-5

    def check_cache(pairs):
        """The file holds exactly these pairs, each with the (chosen, rejected) log-probs of the plain model."""
        cache = torch.load(out / "ref_logps.pt", weights_only=False)["logps"]
        assert sorted(cache) == sorted(set(pair_keys(pairs)))
        cached = torch.tensor([cache[k] for k in pair_keys(pairs)], dtype=torch.float64)  # [n, 2]
        assert (cached - plain_logps(load_model(setup.model).eval(), pairs)).abs().max().item() < 1e-4

    used3 = used_pairs(setup, 3, 4)
    assert len(set(pair_keys(used3))) == 31 < N_PAIRS
    check_cache(used3)

    # a longer run on 1 rank: the 31 pairs are reused, the 3 new steps' 12 pairs computed and added to the file
    proc = dpo(setup, out, "--max-steps", 6, "--eval-frac", SMALL_EVAL, "--batch-size", 4, "--precompute-ref",
               "--overwrite")  # other settings: the earlier run is moved aside, ref_logps.pt stays
    assert "reference log-probs: 43 pairs used, 12 to compute" in proc.stdout and "stale" not in proc.stdout
    assert "reference log-probs of 12 pairs" in proc.stdout, proc.stdout
    assert read_metrics(out)[-6]["loss"] == pytest.approx(LN2, abs=1e-5)  # the cached reference is the model's
    check_cache(used_pairs(setup, 6, 4))
    # another --max-len is another truncation: stale, recomputed (only what this run uses)
    proc = dpo(setup, out, "--max-steps", 1, "--eval-frac", SMALL_EVAL, "--batch-size", 4, "--precompute-ref",
               "--max-len", 768, "--overwrite")
    assert "stale" in proc.stdout and "23 pairs used, 23 to compute" in proc.stdout, proc.stdout
    assert read_metrics(out)[-1]["loss"] == pytest.approx(LN2, abs=1e-5)


def test_stacked_second_round_and_merge(setup, learned, tmp_path):
    """Round 2 trains a new adapter on top of round 1 (frozen): the reference is base + round 1, so step 0 is ln 2
    again; round 1's file is untouched; --merge folds both into an HF dir transformers loads."""
    r1 = learned.out / "final"
    r1_sha = sha(r1 / "adapter_model.safetensors")
    out = tmp_path / "r2"
    dpo(setup, out, "--adapter", r1, "--max-steps", 2, "--lr", 1e-2, "--batch-size", 4, "--eval-frac", 0, "--merge")
    rows = read_metrics(out)
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert rows[0]["chosen_reward"] == 0.0 and rows[0]["rejected_reward"] == 0.0
    # ... and round 1 is part of that policy: the logged log-probs are those of base + round 1
    base_r1 = load_merged(setup.model, [r1])
    logps = plain_logps(base_r1, first_batch(setup, 4, 0.0))
    assert rows[0]["chosen_logps"] == pytest.approx(logps[:, 0].mean().item(), abs=1e-4)
    assert sha(r1 / "adapter_model.safetensors") == r1_sha
    assert lora_b_max(out / "final") > 1e-3

    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    ours = load_merged(setup.model, [r1, out / "final"])
    ids = torch.tensor([first_batch(setup, 4, 0.0)[0]["prompt"]])
    with torch.no_grad():
        hf_logits, our_logits, r1_logits = hf(ids).logits, ours(ids), base_r1(ids)
    assert (hf_logits - our_logits).abs().max().item() < 1e-4
    assert (our_logits - r1_logits).abs().max().item() > 1e-3  # round 2 changed something


def test_round2_on_an_adapter_trained_with_dropout_starts_at_ln2(setup, tmp_path):
    """Round 1 trained with --lora-dropout 0.1: loaded frozen under round 2 it applies no dropout, so the train-mode
    policy pass equals the eval-mode reference pass and step 0 is exactly ln 2 (0.6968 when it kept its dropout)."""
    dpo(setup, tmp_path / "r1", "--max-steps", 3, "--lr", 1e-2, "--batch-size", 4, "--eval-frac", 0,
        "--lora-dropout", 0.1)
    assert json.loads((tmp_path / "r1/final/adapter_config.json").read_text())["lora_dropout"] == 0.1
    assert lora_b_max(tmp_path / "r1/final") > 1e-3
    dpo(setup, tmp_path / "r2", "--adapter", tmp_path / "r1/final", "--max-steps", 1, "--batch-size", 4,
        "--eval-frac", 0)
    first = read_metrics(tmp_path / "r2")[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-6) and first["chosen_reward"] == 0.0, first


def test_precompute_notices_a_retrained_adapter(setup, learned, small, tmp_path):
    """The cache is keyed by the weights under the new adapter: a retrained round-1 adapter at the same path must
    not reuse the old reference (step 0 would then not be ln 2). (The run's record names the adapter's files too, so
    the rerun needs --overwrite, which leaves ref_logps.pt in place: it checks its own fingerprint.)"""
    r1 = tmp_path / "r1"
    shutil.copytree(learned.out / "final", r1)
    args = ("--adapter", r1, "--max-steps", 1, "--batch-size", 4, "--eval-frac", 0, "--precompute-ref")
    dpo(setup, tmp_path / "r2", *args)
    shutil.copy(small / "big" / "final" / "adapter_model.safetensors", r1 / "adapter_model.safetensors")
    proc = dpo(setup, tmp_path / "r2", *args, "--overwrite")
    assert "stale" in proc.stdout, proc.stdout
    rows = read_metrics(tmp_path / "r2")  # the rerun started at step 0 again: its row replaced the first run's
    assert len(rows) == 1 and rows[0]["loss"] == pytest.approx(LN2, abs=1e-5)


def test_sft_term_and_loss_types(setup, small, tmp_path):
    sft = tmp_path / "sft"
    dpo(setup, sft, *SMALL, "--batch-size", 4, "--sft-weight", 1.0)
    rows, big = read_metrics(sft), read_metrics(small / "big")
    # the logged DPO metrics of step 1 are those of the plain run (same batch, same start) ...
    for k in ("loss", "chosen_logps", "rejected_logps"):
        assert rows[0][k] == pytest.approx(big[0][k], abs=1e-6), k
    # ... but the SFT term is in the gradient
    assert abs(rows[0]["grad_norm"] - big[0]["grad_norm"]) > 1e-3 * big[0]["grad_norm"]
    assert all("chosen_logps" in r for r in rows)
    # at step 0 the DPO logits are 0: ipo (0 - 1/(2 beta))^2 = 25, hinge relu(1 - 0) = 1
    for loss_type, expected in (("ipo", (1 / (2 * BETA)) ** 2), ("hinge", 1.0)):
        dpo(setup, tmp_path / loss_type, "--max-steps", 2, "--batch-size", 4, "--lr", 1e-2, "--eval-frac", 0,
            "--loss-type", loss_type)
        rows = read_metrics(tmp_path / loss_type)
        assert len(rows) == 2 and rows[0]["loss"] == pytest.approx(expected, abs=1e-5), loss_type
        assert rows[1]["loss"] < expected, loss_type  # one step in the right direction


def saved_for_backward(fn):
    """(bytes of the distinct storages autograd saves for backward while fn() runs, fn's result)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def graph_leaves(loss):
    """The tensors the backward of `loss` accumulates gradients into (its AccumulateGrad nodes)."""
    seen, todo, leaves = set(), [loss.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        todo += [n for n, _ in node.next_functions]
    return leaves


def test_separate_reference_is_frozen_and_ipo_is_per_token(setup, tmp_path, monkeypatch):
    """--ref: the reference is frozen (eval mode, no .grad after a step) and the loss's graph reaches none of its
    tensors: a step saves for backward what the policy forward saves, nothing more (it used to backpropagate through
    the whole reference, filling .grad on every reference tensor and keeping its activations). Run in-process, as
    `python train_dpo.py`, to look at the script's objects after one step. With a reference other than the policy
    the first IPO loss is not 25: it is the per-token log-ratios' (each answer's summed log-ratio / its length)."""
    import runpy
    import sys
    ref_dir = tmp_path / "ref"
    ref = load_model(setup.model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("mlp.down_proj.weight"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    save_model(ref, ref_dir, tokenizer_from=setup.model)
    argv = ["train_dpo.py", "--model", setup.model, "--data", setup.prefs, "--out", tmp_path / "out", *FP32,
            "--save-every", 0, "--ref", ref_dir, "--loss-type", "ipo", "--max-steps", 1, "--batch-size", 4,
            "--eval-frac", 0]
    monkeypatch.setattr(sys, "argv", [str(a) for a in argv])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the script sets its one-line hook
    g = runpy.run_path(str(Path(__file__).resolve().parents[1] / SCRIPT), run_name="__main__")

    ref_model, model = g["ref_model"], g["model"]
    assert not ref_model.training
    assert all(not p.requires_grad and p.grad is None for p in ref_model.parameters())
    trainable = {id(p) for n, p in model.named_parameters() if ".adapters.default." in n}
    leaves = graph_leaves(g["loss"])
    assert leaves and {id(t) for t in leaves} <= trainable  # the adapter's weights only
    batch = first_batch(setup, 4, 0.0)
    ids, mask, packing = g["batch_tensors"](batch)
    assert not g["reference_logps"](ids, mask).requires_grad
    lengths = [len(ex["chosen"]) for ex in batch] + [len(ex["rejected"]) for ex in batch]  # response tokens
    _, packed_mask, docs, seqs = packed_preference_batch(batch, 1024, setup.chat.pad_id)
    assert g["batch_lengths"](mask, None).tolist() == g["batch_lengths"](packed_mask, (docs, seqs)).tolist() == lengths
    policy_bytes, _ = saved_for_backward(lambda: g["batch_logps"](model, g["lm_head"], ids, mask, None))
    step_bytes, (_, losses, _, _) = saved_for_backward(lambda: g["dpo_forward"](model, ids, mask, batch, BETA))
    assert policy_bytes > 100_000 and step_bytes - policy_bytes < 1024, (step_bytes, policy_bytes)  # the loss's [b]s

    # the first step's IPO loss, from plain logits of the two models
    policy = plain_logps(load_model(setup.model).eval(), batch)
    reference = plain_logps(load_model(ref_dir).eval(), batch)
    lengths = torch.tensor([[len(ex["chosen"]), len(ex["rejected"])] for ex in batch], dtype=torch.float64)
    per_token = (policy - reference) / lengths  # [b, 2]
    expected = ((per_token[:, 0] - per_token[:, 1] - 1 / (2 * BETA)) ** 2).mean().item()
    summed = (((policy - reference) @ torch.tensor([1.0, -1.0], dtype=torch.float64) - 1 / (2 * BETA)) ** 2).mean()
    assert abs(expected - summed.item()) > 0.1 and abs(expected - 25) > 0.1  # the test tells the three apart
    assert read_metrics(tmp_path / "out")[0]["loss"] == pytest.approx(expected, abs=1e-4)


def test_length_penalty_is_r_dpo_and_recorded(setup, tmp_path):
    """--length-penalty alpha: at step 0 (policy = reference, margin 0) the loss is the mean over the first batch of
    -log sigmoid(alpha * (|y_w| - |y_l|)), lengths in response tokens; the setting is recorded in run_settings.json
    (a resume with another alpha stops) and shown in the model card; other loss types refuse it."""
    rng, rows = random.Random(3), []
    for i in range(40):  # toy pairs whose chosen (even rows) or rejected (odd rows) answer is a sentence
        pair = toy.preference_pair(rng)
        answer = pair[("chosen", "rejected")[i % 2]][-1]
        answer["content"] = f"The answer is {answer['content']}."
        rows.append(pair)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = tmp_path / "rdpo"
    args = ("--data", prefs, "--max-steps", 1, "--batch-size", 4, "--eval-frac", 0)
    run_script(SCRIPT, "--model", setup.model, "--out", out, *FP32, *args, "--length-penalty", 0.05)
    batch = first_batch(setup, 4, 0.0, prefs=prefs)
    diff = torch.tensor([len(ex["chosen"]) - len(ex["rejected"]) for ex in batch], dtype=torch.float64)
    assert (diff > 0).any() and (diff < 0).any(), diff  # longer chosen and longer rejected answers
    expected = -F.logsigmoid(0.05 * diff).mean().item()
    assert read_metrics(out)[0]["loss"] == pytest.approx(expected, abs=1e-6)
    assert abs(expected - LN2) > 1e-3
    assert json.loads((out / "run_settings.json").read_text())["--length-penalty"] == 0.05
    assert "| length_penalty | `0.05` |" in (out / "final" / "README.md").read_text()
    proc = run_script(SCRIPT, "--model", setup.model, "--out", out, *FP32, *args, "--length-penalty", 0.1, check=False)
    assert proc.returncode != 0 and "--length-penalty 0.1 (was 0.05)" in last_line(proc.stderr), proc.stderr[-2000:]


def test_missing_field_names_file_and_line(setup, tmp_path):
    rows = [toy.preference_pair(random.Random(i)) for i in range(4)]
    del rows[2]["rejected"]
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    proc = run_script(SCRIPT, "--model", setup.model, "--data", data, "--out", tmp_path / "out", *FP32, check=False)
    assert proc.returncode != 0
    assert "prefs.jsonl:3" in last_line(proc.stderr) and "'rejected'" in last_line(proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "out" / "final").exists()


def test_help():
    proc = run_script(SCRIPT, "--help")
    assert proc.returncode == 0
    assert "torchrun" in proc.stdout and "--precompute-ref" in proc.stdout and "--adapter" in proc.stdout
    help_text = " ".join(proc.stdout.split())  # argparse wraps lines
    assert "ipo: IPO on per-token log-ratios" in help_text and "R-DPO's alpha" in help_text


def test_bf16_base_with_fp32_adapter(setup, tmp_path):
    """Under bf16 autocast the frozen base is held in bf16 (--base-dtype auto) while the adapter trains in fp32;
    step 0 is still exactly ln 2 and --merge folds the adapter in fp32 into a dir of the checkpoint's dtype."""
    out = tmp_path / "bf16"
    dpo(setup, out, "--precision", "bf16", "--max-steps", 3, "--batch-size", 4, "--lr", 1e-2, "--eval-frac", 0,
        "--merge")
    rows = read_metrics(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert {t.dtype for t in load_file(out / "final/adapter_model.safetensors").values()} == {torch.float32}
    assert lora_b_max(out / "final") > 0
    merged = json.loads((out / "merged/config.json").read_text())
    assert merged["torch_dtype"] == "float32"  # the toy checkpoint's own dtype


def test_human_and_synthetic_sources_are_mixed(setup, tmp_path):
    """Two --data sources with --data-weights: UltraFeedback-style rows plus our synthetic string rows."""
    rng = random.Random(5)
    synthetic = []
    for _ in range(40):
        pair = toy.preference_pair(rng)
        synthetic.append(dict(prompt_id=str(len(synthetic)), prompt=pair["prompt"], chosen=pair["chosen"][-1]["content"],
                              rejected=pair["rejected"][-1]["content"], score_chosen=1.0, score_rejected=0.1))
    synth_file = write_jsonl(tmp_path / "pairs.jsonl", synthetic)
    out = tmp_path / "mixed"
    proc = run_script(SCRIPT, "--model", setup.model, "--data", setup.prefs, "--data", synth_file,
                      "--data-weights", "0.25,1.5", "--out", out, *FP32, "--save-every", 0, "--max-steps", 1,
                      "--batch-size", 4, "--eval-frac", 0.1)
    # 10% held out of each source first (35 + 4 pairs, each once), then the rest mixed:
    # round(0.25 * 317) human + round(1.5 * 36) synthetic = 79 + 54 pairs
    assert "133 train / 39 eval pairs" in proc.stdout
    assert f"{setup.prefs}: {{'kept': {N_PAIRS}" in proc.stdout and f"{synth_file}: {{'kept': 40" in proc.stdout
    bad = run_script(SCRIPT, "--model", setup.model, "--data", setup.prefs, "--data-weights", "1,1", "--out",
                     tmp_path / "bad", *FP32, check=False)
    assert bad.returncode != 0 and "--data-weights has 2 values for 1 --data sources" in last_line(bad.stderr)


def test_diverging_run_stops_with_one_line_and_saves_no_nan(setup, tmp_path):
    """--lr 1e30 blows the adapter up after one update: the NaN steps are skipped, the third in a row stops the run
    with one line, no final/ (it used to exit 0 with a NaN adapter and NaN tokens in metrics.jsonl)."""
    out = tmp_path / "out"
    proc = dpo(setup, out, "--lr", 1e30, "--max-steps", 20, "--batch-size", 4, "--eval-frac", 0, "--save-every", 1,
               check=False)
    rows = check_stopped_on_nan(proc, out)
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-6) and not (out / "merged").exists()
def test_prompt_budget_defaults_to_half_of_max_len(setup, tmp_path):
    """--max-len 512 alone runs: --max-prompt-len follows it (256) instead of failing against a fixed 512."""
    dpo(setup, tmp_path / "short", "--max-len", 512, "--max-steps", 1, "--batch-size", 4, "--eval-frac", 0)
    assert read_metrics(tmp_path / "short")[0]["loss"] == pytest.approx(LN2, abs=1e-6)


@pytest.mark.parametrize("args, message", [
    (("--max-len", 512, "--max-prompt-len", 512), "--max-prompt-len 512 must be below --max-len 512 (responses need room too)"),
    (("--batch-size", 200, "--grad-accum", 2),
     "334 pairs are fewer than one global batch (--batch-size x --grad-accum x world size)"),
    (("--loss-type", "ipo", "--label-smoothing", 0.1), "--label-smoothing needs --loss-type sigmoid"),
    (("--loss-type", "hinge", "--length-penalty", 0.1), "--length-penalty needs --loss-type sigmoid"),
])
def test_argument_errors_name_the_flags(setup, tmp_path, args, message):
    """An argument error is one line in the user's flag words, and comes before any training output."""
    proc = dpo(setup, tmp_path / "out", "--eval-frac", 0.05, *args, check=False)
    assert proc.returncode == 1 and last_line(proc.stderr) == f"error: {message}", proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "metrics.jsonl").exists()
