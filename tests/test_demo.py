"""The README's first command, run as a user would: the whole pipeline on the toy task, offline, on CPU (~2 min of CPU)."""
import json
import re
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from nanoalign.jsonl import read_jsonl
from nanoalign.demo import N_EVAL
from tests.fixtures import ROOT

README = ROOT / "README.md"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "nanoalign.demo", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.parametrize("name", ["dpo vs sft", "round 2 vs dpo"])
def test_demo_each_round_wins(demo, name):
    out, _ = demo
    result = json.loads((out / "results.json").read_text())["evals"][name]
    assert result["n"] == N_EVAL and result["wins"] + result["losses"] + result["ties"] == N_EVAL
    assert result["mean_reward_a"] > result["mean_reward_b"]  # the later model's mean reward is higher
    assert result["ci95"][0] > 0.5                              # and it wins on held-out prompts, whole interval
    # the length-aware numbers are there (their values depend on the CPU's float arithmetic, like the rest)
    assert 0 <= result["lc_win_rate"] <= 1 and result["lc_ci95"][0] <= result["lc_ci95"][1]
    assert {"a", "b"} == set(result["lengths"]) and result["lengths"]["a"]["mean_tokens"] > 0


def test_readme_shows_the_demo_table(demo):
    """README's block has the printed table's header, rows and lines (numbers may differ, words may not), and
    every win rate the README quotes for the demo holds what must hold on any CPU: its Wilson interval lies above
    0.5. The exact figures depend on the CPU's float arithmetic, so they are not compared."""
    _, stdout = demo
    section = README.read_text().split("held-out prompts", 1)[1].split("## Using it on Qwen2.5", 1)[0]
    readme_lines = ("held-out prompts" + section.split("```", 1)[0]).strip().splitlines()
    printed = stdout[stdout.index("held-out prompts"):].splitlines()[:len(readme_lines)]
    shape = lambda line: re.sub(r"\d+", "9", line).split()  # noqa: E731
    assert [shape(x) for x in readme_lines] == [shape(x) for x in printed]
    number = r"(\d\.\d{3})"
    quoted = [m.groups() for line in readme_lines[1:3]  # the block's two rows: win rate, then its Wilson interval
              for m in [re.match(rf".+? {number}\s+\[{number}, {number}\]", line)]]
    quoted += re.findall(rf"\| {number} \[{number}, {number}\]", section)  # the table of seeds and machines
    table_rows = re.findall(r"^\| \d.*\|$", section, re.M)
    assert len(table_rows) >= 4 and len(quoted) == 2 + 2 * len(table_rows), quoted  # every row's two figures read
    for rate, low, high in quoted:
        assert 0.5 < float(low) <= float(rate) <= float(high), (rate, low, high)


def test_demo_artefacts_are_well_formed(demo):
    out, stdout = demo
    # every training run logged metrics; DPO starts at exactly ln 2 (adapter B = 0: policy == reference)
    sft, dpo, dpo2 = (read_jsonl(out / run / "metrics.jsonl") for run in ("sft", "dpo", "dpo2"))
    assert sft[-1]["loss"] < 0.5 * sft[0]["loss"] and "eval_loss" in sft[-1]
    assert abs(dpo[0]["loss"] - 0.693147) < 1e-5 and abs(dpo2[0]["loss"] - 0.693147) < 1e-5
    assert len(dpo) == 60 and len(dpo2) == 100
    # HF model dir and PEFT adapters
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (out / "sft/final").iterdir()}
    for run in ("dpo", "dpo2"):
        config = json.loads((out / run / "final/adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 16
        assert all(k.startswith("base_model.model.model.layers.")
                   for k in load_file(out / run / "final/adapter_model.safetensors"))
    # synthetic data: every prompt sampled 8 times, pairs are best/worst with a gap of at least 0.5
    samples = read_jsonl(out / "synth/samples.jsonl")
    pairs = read_jsonl(out / "synth/pairs.jsonl")
    assert len(samples) % 8 == 0 and len(pairs) > 100
    assert all(p["score_chosen"] - p["score_rejected"] >= 0.5 and p["chosen"].strip() for p in pairs)
    assert len(read_jsonl(out / "eval_dpo_vs_sft/per_prompt.jsonl")) == N_EVAL
    # the HTML pages: a report per eval and for the synthetic pairs, and compare.html linking both evals
    assert all((out / d / "report.html").exists() for d in ("eval_dpo_vs_sft", "eval_round_2_vs_dpo", "synth"))
    assert 'href="eval_dpo_vs_sft/report.html"' in (out / "compare.html").read_text()
    assert f"pages: {out / 'compare.html'}" in stdout
    # the figures are real PNGs (matplotlib, from the `plot` extra that the README's demo line installs)
    plt = pytest.importorskip("matplotlib.pyplot")
    assert plt.imread(out / "curves.png").shape == (680, 1500, 4)  # SFT loss, DPO loss, acc, margin, log-probs
    assert plt.imread(out / "winrates.png").shape[:2] == (260, 700)  # two comparisons
