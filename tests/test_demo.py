"""The README's first command, run as a user would: the whole pipeline on the toy task, offline, on CPU (~1.5 min)."""
import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from nanoalign.jsonl import read_jsonl
from tests.fixtures import ROOT


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "nanoalign.demo", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_dpo_beats_sft(demo):
    out, stdout = demo
    results = json.loads((out / "results.json").read_text())
    dpo_vs_sft = results["evals"]["dpo vs sft"]
    assert dpo_vs_sft["n"] == 300 and dpo_vs_sft["wins"] + dpo_vs_sft["losses"] + dpo_vs_sft["ties"] == 300
    assert dpo_vs_sft["mean_reward_a"] > dpo_vs_sft["mean_reward_b"]  # DPO's mean reward exceeds SFT's
    assert dpo_vs_sft["ci95"][0] > 0.5                                 # and it wins on held-out prompts
    assert "dpo vs sft" in stdout and "round 2 vs dpo" in stdout


def test_demo_artefacts_are_well_formed(demo):
    out, _ = demo
    # every training run logged metrics; DPO starts at exactly ln 2 (adapter B = 0: policy == reference)
    sft, dpo, dpo2 = (read_jsonl(out / run / "metrics.jsonl") for run in ("sft", "dpo", "dpo2"))
    assert sft[-1]["loss"] < 0.5 * sft[0]["loss"] and "eval_loss" in sft[-1]
    assert abs(dpo[0]["loss"] - 0.693147) < 1e-5 and abs(dpo2[0]["loss"] - 0.693147) < 1e-5
    assert len(dpo) == 200 and len(dpo2) == 100
    # HF model dir and PEFT adapters
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (out / "sft/final").iterdir()}
    for run in ("dpo", "dpo2"):
        config = json.loads((out / run / "final/adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 16
        assert all(k.startswith("base_model.model.model.layers.")
                   for k in load_file(out / run / "final/adapter_model.safetensors"))
    # synthetic data: every prompt sampled 4 times, pairs are best/worst with a real gap
    samples = read_jsonl(out / "synth/samples.jsonl")
    pairs = read_jsonl(out / "synth/pairs.jsonl")
    assert len(samples) % 4 == 0 and len(pairs) > 100
    assert all(p["score_chosen"] - p["score_rejected"] >= 0.5 and p["chosen"].strip() for p in pairs)
    assert len(read_jsonl(out / "eval_dpo_vs_sft/per_prompt.jsonl")) == 300
    # the figures are real PNGs (matplotlib, from the `plot` extra that the README's demo line installs)
    plt = pytest.importorskip("matplotlib.pyplot")
    assert plt.imread(out / "curves.png").shape == (680, 1500, 4)  # SFT loss, DPO loss, acc, margin, log-probs
    assert plt.imread(out / "winrates.png").shape[:2] == (260, 700)  # two comparisons
