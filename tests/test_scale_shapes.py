"""The scale tier at real shapes: Qwen2.5-0.5B's real config (151,936-row vocabulary, hidden 896, 14 heads / 2 kv
heads, intermediate 4,864, tied embeddings), its 24 layers cut to 2 for time, stored in bf16 as on the hub, taken
through the pipeline as a user runs it: full SFT, LoRA DPO, synthetic pairs from the DPO model, and a win rate judged
by a reward model of the same shapes. The toy tokenizer stands in for Qwen's (check_vocab allows a tokenizer smaller
than the embedding, as Qwen2.5's own is). Each script's peak RSS is checked against what the README promises."""
import json
import random
import re

import pytest
import torch

from nanoalign import toy
from nanoalign.chat import load_chat
from nanoalign.model import CausalLM, ModelConfig, save_model
from nanoalign.reward import SequenceClassifier
from tests.fixtures import ROOT, read_metrics, run_script, write_jsonl

VOCAB = 151936
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=2,  # of 24
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
CPU = ("--precision", "fp32", "--device", "cpu")
# The script, as `python script ...`, inside a process that prints its own peak RSS when the script is done: VmHWM,
# which exec resets (getrusage's ru_maxrss would also count the forking pytest process's RSS)
PEAK_RSS = ("import re, runpy, sys\n"
            "sys.argv = sys.argv[1:]\n"
            "try:\n"
            "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "finally:\n"
            "    kib = int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
            "    print(f'peak RSS {kib / 2**20:.3f} GiB', file=sys.stderr)\n")


def readme_bounds():
    """The peak RSS the README promises each script at these shapes, GiB: {"train_sft.py": 4.0, ...}."""
    text = (ROOT / "README.md").read_text()
    row = re.search(r"\| scale-test peak RSS \|(.*)\|\n", text)
    assert row, "README.md has no 'scale-test peak RSS' row"
    cells = [c.strip() for c in row.group(1).split("|")]
    return dict(zip(("train_sft.py", "train_dpo.py", "gen_synthetic.py", "eval_winrate.py"),
                    (float(c.removesuffix(" GiB")) for c in cells)))


def run_measured(script, *args):
    """run_script(script, *args), and the process's peak RSS in GiB."""
    proc = run_script("-c", PEAK_RSS, script, *args, timeout=600)
    return proc, float(re.search(r"peak RSS ([\d.]+) GiB", proc.stderr).group(1))


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Toy tokenizer, the real-shape policy (bf16 on disk) and reward model, toy data."""
    root = tmp_path_factory.mktemp("real_shapes")
    tok = toy.build_tokenizer(root / "tokenizer")
    chat = load_chat(tok)
    hf = toy.tiny_config(VOCAB, bos_token_id=chat.endoftext_id, eos_token_id=chat.im_end_id,
                         **QWEN25_05B)
    config = ModelConfig.from_hf(hf)
    base = save_model(CausalLM(config).init_weights(seed=0), root / "base", tokenizer_from=tok, dtype=torch.bfloat16)
    reward = SequenceClassifier(config, 1)
    reward.config = config
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in reward.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else
                    torch.zeros_like(p) if name.endswith(".bias") else torch.randn_like(p) * 0.02)
    rm = save_model(reward, root / "rm", tokenizer_from=tok, dtype=torch.bfloat16,
                    architecture="Qwen2ForSequenceClassification")
    rng = random.Random(0)
    prompts = [{"prompt_id": str(i), "prompt": toy.make_prompt(rng, high=9)[0][0]["content"]} for i in range(4)]
    return dict(base=base, rm=rm, sft=write_jsonl(root / "sft.jsonl", [toy.sft_demo(rng) for _ in range(8)]),
                prefs=write_jsonl(root / "prefs.jsonl", [toy.preference_pair(rng) for _ in range(8)]),
                prompts=write_jsonl(root / "prompts.jsonl", prompts), root=root)


@pytest.mark.scale
def test_pipeline_at_qwen25_shapes_stays_within_the_readme_memory(real, tmp_path):
    out, bounds, peaks = tmp_path, readme_bounds(), {}
    sft, dpo = out / "sft", out / "dpo"
    _, peaks["train_sft.py"] = run_measured(
        "train_sft.py", "--model", real["base"], "--data", real["sft"], "--out", sft, *CPU, "--max-steps", 2,
        "--batch-size", 4, "--max-len", 128, "--eval-frac", 0, "--save-every", 0, "--lr", 1e-4)
    assert [r["step"] for r in read_metrics(sft)] == [1, 2] and (sft / "final/model.safetensors").exists()
    _, peaks["train_dpo.py"] = run_measured(
        "train_dpo.py", "--model", sft / "final", "--data", real["prefs"], "--out", dpo, *CPU, "--max-steps", 2,
        "--batch-size", 2, "--eval-frac", 0, "--save-every", 0)
    rows = read_metrics(dpo)
    assert len(rows) == 2 and rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy = reference at step 0
    sample = ("--max-new-tokens", 8, "--max-prompts", 4, *CPU)
    _, peaks["gen_synthetic.py"] = run_measured(
        "gen_synthetic.py", "--model", sft / "final", "--adapter", dpo / "final", "--prompts", real["prompts"],
        "--num-samples", 2, "--reward", "toy", "--out", out / "synth", *sample)
    samples = [json.loads(line) for line in (out / "synth/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(1 <= s["n_tokens"] <= 8 for s in samples)
    _, peaks["eval_winrate.py"] = run_measured(
        "eval_winrate.py", "--model-a", sft / "final", "--adapter-a", dpo / "final", "--model-b", sft / "final",
        "--prompts", real["prompts"], "--reward", real["rm"], "--out", out / "eval", *sample)
    summary = json.loads((out / "eval/summary.json").read_text())
    assert summary["wins"] + summary["losses"] + summary["ties"] == 4
    over = {k: (v, bounds[k]) for k, v in peaks.items() if v > bounds[k]}
    assert not over, f"peak RSS over the README's bound (GiB, measured vs bound): {over}; all: {peaks}"
