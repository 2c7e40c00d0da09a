"""GPU-hours of the whole pipeline: measured per-stage throughputs x the seed papers' workloads.

    python bench/pipeline.py --log $OUT/bench.log      # RESULT lines of bench/run_all.sh (ours and the peer's)
    python bench/pipeline.py --tiny                    # CPU smoke test: runs the tiny benches, then the table

Workloads (shared/SEEDS.md and issue #13): SFT one epoch of smol-smoltalk (460,341 conversations, lengths
common.SMOLTALK_HIST: ASSUMED shape, ~900 tokens mean from the dataset card's bytes, conversations over 2,048
dropped); DPO one epoch of UltraFeedback train_prefs (61,135 pairs); synthetic 5,000 prompts x 4 samples of
256 new tokens, each sample scored by the reward model; eval 500 prompts x 2 models x 256 new tokens, both
answers scored. Per stage, the throughput used (first case found in the log):

  stage        ours                                               peer
  sft          ours_sft_real_packed_* real_tokens_per_s,           trl_sft_full* tokens_per_s
               else ours_sft_full_1024x8 trained_tokens_per_s
  dpo          ours_dpo_lora_bf16base*_real, else ours_dpo_lora_*  trl_dpo_lora* pairs_per_s
  generate     ours_generate_synth, else _bs64: new_tokens_per_s   hf_generate_dynamic_bs64 / hf_inproc_generate_dynamic_bs64
  reward       ours_reward_qwen3 rows_per_s                        hf_inproc_reward_qwen3 rows_per_s

GPU-hours = work / throughput / 3600 on the GPU the log was measured on (an H100 for the issue's table). A stage
with no measured case prints "unmeasured"; nothing is filled in from quoted figures. Data loading, tokenising,
checkpoints and evaluation passes inside training are not counted (see bench/RESULTS.md).
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SMOLTALK_CONVERSATIONS, UF_PAIRS = 460_341, 61_135
SYNTH_SAMPLES, EVAL_ANSWERS, NEW_TOKENS = 5_000 * 4, 500 * 2, 256

STAGES = {  # stage: ([(our case prefix, field)], [(peer case prefix, field)])
    "sft": ([("ours_sft_real_packed", "real_tokens_per_s"), ("ours_sft_full_1024x8", "trained_tokens_per_s")],
            [("trl_sft_full", "tokens_per_s")]),
    "dpo": ([("ours_dpo_lora_bf16base_real", "pairs_per_s"), ("ours_dpo_lora_bf16base", "pairs_per_s"),
             ("ours_dpo_lora", "pairs_per_s")], [("trl_dpo_lora", "pairs_per_s")]),
    "generate": ([("ours_generate_synth", "new_tokens_per_s"), ("ours_generate_bs64", "new_tokens_per_s")],
                 [("hf_generate_dynamic_bs64", "new_tokens_per_s"), ("hf_inproc_generate_dynamic_bs64",
                                                                    "new_tokens_per_s")]),
    "reward": ([("ours_reward_qwen3", "rows_per_s")], [("hf_inproc_reward_qwen3", "rows_per_s")]),
}


def sft_tokens():
    """Real tokens of one smol-smoltalk epoch at --max-len 2048 under the assumed histogram."""
    lengths = common.sample_lengths(common.SMOLTALK_HIST, 100_000, seed=0)
    kept = [n for n in lengths if n <= 2048]
    return SMOLTALK_CONVERSATIONS * len(kept) / len(lengths) * sum(kept) / len(kept)


def workloads():
    return {"sft": sft_tokens(), "dpo": UF_PAIRS, "generate": (SYNTH_SAMPLES + EVAL_ANSWERS) * NEW_TOKENS,
            "reward": SYNTH_SAMPLES + EVAL_ANSWERS}


def read_results(lines):
    out = {}
    for line in lines:
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            if "error" not in r and r.get("case") != "skipped":
                out.setdefault(r["case"], r)
    return out


def throughput(results, choices):
    for prefix, field in choices:
        for case, r in results.items():
            if case.startswith(prefix) and r.get(field):
                return case, r[field]
    return None, None


def table(results):
    work, rows, totals = workloads(), [], {"ours": 0.0, "peer": 0.0}
    tiny = any(r.get("tiny") for r in results.values())
    complete = {"ours": True, "peer": True}
    for stage, sides in STAGES.items():
        row = [stage, f"{work[stage]:,.0f}"]
        for side, choices in zip(("ours", "peer"), sides):
            case, tps = throughput(results, choices)
            if tps is None:
                complete[side] = False
                row += ["unmeasured", "-"]
                continue
            hours = work[stage] / tps / 3600
            totals[side] += hours
            row += [f"{case}: {tps:,.1f}/s", f"{hours:,.2f}"]
        rows.append(row)
    header = ["stage", "work (tokens/pairs/rows)", "ours: case, rate", "ours GPU-h", "peer: case, rate", "peer GPU-h"]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in rows:
        print(" | ".join(row))
    total = {s: (f"{totals[s]:,.2f}" if complete[s] else f">= {totals[s]:,.2f} (stages unmeasured)") for s in totals}
    print(f"total GPU-hours: ours {total['ours']}, TRL + PEFT + HF generate {total['peer']}")
    if tiny:
        print("(--tiny CPU smoke-test rates: these hours mean nothing)")
    return totals


def run_tiny():
    """The tiny benches on CPU, their RESULT lines collected."""
    bench = Path(__file__).resolve().parent
    cmds = [["bench_sft.py", "--tiny", "--cases", "real"], ["bench_dpo.py", "--tiny", "--cases", "bf16+real"],
            ["bench_generate.py", "--tiny", "--cases", "synth"], ["bench_reward.py", "--tiny"]]
    lines = []
    for cmd in cmds:
        proc = subprocess.run([sys.executable, str(bench / cmd[0]), *cmd[1:]], capture_output=True, text=True)
        lines += proc.stdout.splitlines()
        if proc.returncode:
            print(f"{cmd[0]} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", action="append", default=[], help="bench log or results.jsonl with RESULT lines")
    p.add_argument("--tiny", action="store_true", help="run the tiny CPU benches first (smoke test)")
    args = p.parse_args()
    lines = run_tiny() if args.tiny else []
    for path in args.log:
        lines += [line if line.startswith("RESULT ") else "RESULT " + line
                  for line in Path(path).read_text().splitlines() if line.strip().startswith(("RESULT ", "{"))]
    if not lines:
        p.error("give --log (a bench log) or --tiny")
    table(read_results(lines))


if __name__ == "__main__":
    main()
