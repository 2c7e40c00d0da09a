"""recipes/: every paper's recipe runs end to end with --smoke (the demo's tiny model and toy data, on CPU), and the
paper settings the scripts gained for them, worked out by hand: DPO's clamped margin (E), the beta ramp (E), the
step-halving learning rate (A) and the near-duplicate pair filter (E)."""
import json
import math
import os
import subprocess

import pytest
import torch

from nanoalign.losses import dpo_loss
from nanoalign.preferences import text_similarity
from nanoalign.train import beta_at, lr_at
from tests.fixtures import ROOT, json_server, read_metrics, run_script

RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.sh") if p.name != "common.sh")


def test_clamped_margin_loss_by_hand():
    # pair 0: margin (-10 - -40) - (-20 - -20) = 30, clamped to 20: loss -log sigmoid(0.1 * 20) = log(1 + e^-2)
    # pair 1: margin (-12 - -10) - (-11 - -11) = -2, inside the clamp: log(1 + e^0.2)
    policy_c = torch.tensor([-10.0, -12.0], requires_grad=True)
    policy_r = torch.tensor([-40.0, -10.0], requires_grad=True)
    ref_c, ref_r = torch.tensor([-20.0, -11.0]), torch.tensor([-20.0, -11.0])
    losses, _, _ = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.1, margin_clamp=20)
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-2)), math.log(1 + math.exp(0.2))], abs=1e-6)
    assert losses.tolist()[0] == pytest.approx(0.126928, abs=1e-6)
    losses.sum().backward()
    # past the clamp the pair stops pulling; inside it the gradient is beta * (sigmoid(beta * margin) - 1)
    assert policy_c.grad.tolist() == pytest.approx([0.0, 0.1 * (1 / (1 + math.exp(0.2)) - 1)], abs=1e-7)
    unclamped, _, _ = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.1)
    assert unclamped.tolist()[0] == pytest.approx(math.log(1 + math.exp(-3)), abs=1e-6)


def test_beta_ramp_and_step_lr_by_hand():
    # E: beta 0.015 over 100 steps: 0.015 * (step + 1) / 100, then flat
    assert [beta_at(s, 0.015, 100) for s in (0, 1, 49, 98, 99, 100, 5000)] == pytest.approx(
        [0.00015, 0.0003, 0.0075, 0.01485, 0.015, 0.015, 0.015])
    assert beta_at(0, 0.1) == 0.1  # no warm-up
    # A: 1e-6 halved every 20% of an epoch; 100 steps an epoch -> every 20 steps
    assert [lr_at(s, 300, 1e-6, schedule="step", step_every=20, gamma=0.5) for s in (0, 19, 20, 39, 40, 100)] == \
        pytest.approx([1e-6, 1e-6, 5e-7, 5e-7, 2.5e-7, 1e-6 / 32])


def test_text_similarity_by_hand():
    # word counts {a: 2, b: 1} and {a: 1, b: 2}: (2 + 2) / (sqrt 5 * sqrt 5) = 0.8
    assert text_similarity("a a b", "a b b") == pytest.approx(0.8)
    assert text_similarity("The answer is 9.", "the ANSWER is 9") == pytest.approx(1.0)
    assert text_similarity("9", "7") == 0.0 and text_similarity("", "") == 0.0


def gpt_pair(path, headers, body):
    """A stub chat model writing D's JSON pairs: the right digit sum as chosen, one off as rejected."""
    return 200, {"choices": [{"message": {"role": "assistant", "content": '{"chosen": "9", "rejected": "8"}'}}]}


@pytest.mark.slow
def test_every_recipe_runs_in_smoke_mode(tmp_path):
    assert RECIPES == ["A_000.sh", "B_001.sh", "C_002.sh", "D_003.sh", "E_004.sh"]
    for recipe in RECIPES:
        out = tmp_path / recipe[:-3]
        env = {**os.environ, "OUT": str(out)}
        with json_server(gpt_pair) as url:  # D also runs its GPT-4o-pairs stage, against the stub
            if recipe == "D_003.sh":
                env["PAIR_WRITER_URL"] = url
            proc = subprocess.run(["bash", str(ROOT / "recipes" / recipe), "--smoke"], cwd=ROOT, capture_output=True,
                                  text=True, timeout=600, env=env)
        assert proc.returncode == 0, f"{recipe}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        evals = sorted(out.glob("eval_*/summary.json"))
        assert evals, recipe
        for path in evals:
            assert json.loads(path.read_text())["n"] == 4
        for card in out.glob("*/final/README.md"):
            assert "--smoke" not in card.read_text()  # the card names the script's own command
    assert len((tmp_path / "D_003/gpt_pairs/pairs.jsonl").read_text().splitlines()) == 8
    assert (tmp_path / "D_003/eval_dpo_gpt_vs_sft/summary.json").exists()
    # the paper settings reached the runs: A's step-halving lr, E's beta ramp and margin clamp
    assert "| schedule | `step` |" in (tmp_path / "A_000/dpo/final/README.md").read_text()
    assert read_metrics(tmp_path / "A_000/dpo")[0]["lr"] == 1e-6
    e_dpo = read_metrics(tmp_path / "E_004/dpo")
    assert [r["beta"] for r in e_dpo] == pytest.approx([0.015 / 100, 0.015 * 2 / 100])
    card = (tmp_path / "E_004/dpo/final/README.md").read_text()
    assert "| margin_clamp | `20` |" in card and "| beta_warmup_steps | `100` |" in card
    # E's near-duplicate filter, rebuilt from the samples on disk with a strict threshold (no sampling: all done)
    synth = tmp_path / "E_004/synth"
    samples = [json.loads(line) for line in (synth / "samples.jsonl").read_text().splitlines()]
    # (the sampling settings as the recipe recorded them in run_settings.json; the pair filters may change)
    run_script("gen_synthetic.py", "--model", tmp_path / "E_004/sft/final", "--prompts",
               tmp_path / "E_004/smoke/data/gen_prompts.jsonl", "--max-prompts", 8, "--num-samples", 4,
               "--temperature", 1.0, "--top-p", 1.0, "--max-new-tokens", 32, "--precision", "fp32", "--min-gap", 0,
               "--keep-truncated", "--reward", "toy", "--max-similarity", 0.0, "--out", synth)
    summary = json.loads((synth / "summary.json").read_text())
    by_prompt = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_id"], []).append(s)
    similar = 0
    for group in by_prompt.values():
        best, worst = max(group, key=lambda s: s["score"]), min(group, key=lambda s: s["score"])
        similar += best["score"] > worst["score"] and text_similarity(best["response"], worst["response"]) > 0
    assert summary.get("pairs_too_similar", 0) == similar
    assert all(text_similarity(p["chosen"], p["rejected"]) == 0 for p in map(json.loads, open(synth / "pairs.jsonl")))
