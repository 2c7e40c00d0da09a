"""Summarise the RESULT lines of a benchmark log: one line per case, then the goals checked against the peer.

    python bench/summarize.py $OUT/bench.log        # or results.jsonl (bare JSON lines); run_all.sh calls it

Ratios use the peer's numbers measured in the SAME log (shared/bench/peer_bench.py's trl_* / hf_generate_* cases,
and bench_generate.py --peer's hf_inproc_* cases), never the figures quoted in bench/RESULTS.md. A goal whose
ours or peer case is missing (not run, skipped for time, or an error) prints n/a.
"""
import json
import sys

KEYS = ("tokens_per_s", "pairs_per_s", "new_tokens_per_s", "rows_per_s", "mfu", "peak_gib", "ours_over_hf",
        "logits_rel_diff", "scores_rel_diff", "decode_backends_accepting_mask_gqa", "decode_ms_as_called",
        "decode_ms_kv_expanded", "decode_ms_grouped_engine", "warmup_s", "error", "skipped")


def read(path):
    rows = []
    for line in open(path):
        line = line.strip()
        if line.startswith("RESULT "):
            line = line[len("RESULT "):]
        elif not line.startswith("{"):
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def main(path):
    rows = read(path)
    for r in rows:
        bits = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k in KEYS if (v := r.get(k)) is not None]
        print(f"{r.get('case', '?'):48s} " + " ".join(bits))

    if any(r.get("tiny") or r.get("gpu") == "cpu" for r in rows):
        print("\ngoals not checked: this log holds --tiny / CPU smoke-test rows, which are no performance figures")
        return
    by = {r["case"]: r for r in rows if "case" in r and "error" not in r and "skipped" not in r}
    print("\ngoals (ours vs the peer measured in this log):")

    def check(label, ours, key, peer=None, ratio_at_least=None, ratio_at_most=None, at_least=None, at_most=None):
        a = by.get(ours, {}).get(key)
        b = by.get(peer, {}).get(key) if peer else None
        if a is None or (peer and b is None):
            print(f"  {label:66s} n/a ({ours if a is None else peer} missing)")
            return
        if peer:
            x = a / b
            ok = x >= ratio_at_least if ratio_at_least is not None else x <= ratio_at_most
            print(f"  {label:66s} {a:.4g} / {b:.4g} = {x:.3g}x -> {'MET' if ok else 'not met'}")
        else:
            ok = a >= at_least if at_least is not None else a <= at_most
            print(f"  {label:66s} {a:.4g} -> {'MET' if ok else 'not met'}")

    for ours in ("ours_sft_full_1024x8", "ours_sft_full_1024x8_compile"):
        check(f"SFT tokens/s >= 2x TRL ({ours})", ours, "tokens_per_s", "trl_sft_full", ratio_at_least=2.0)
        check(f"SFT MFU >= 40% ({ours})", ours, "mfu", at_least=0.40)
        check(f"SFT peak <= 0.85x TRL ({ours})", ours, "peak_gib", "trl_sft_full", ratio_at_most=0.85)
    for ours in ("ours_sft_full_2048x8", "ours_sft_full_2048x8_ckpt", "ours_sft_full_2048x8_ckpt_compile"):
        check(f"SFT 2048x8 peak <= 22 GiB ({ours})", ours, "peak_gib", at_most=22.0)
    for ours in ("ours_dpo_lora_fp32base", "ours_dpo_lora_fp32base_precompute_ref", "ours_dpo_lora_bf16base",
                 "ours_dpo_lora_bf16base_precompute_ref", "ours_dpo_lora_bf16base_drop0"):
        check(f"DPO pairs/s >= 2.5x TRL+PEFT ({ours})", ours, "pairs_per_s", "trl_dpo_lora", ratio_at_least=2.5)
        check(f"DPO peak <= TRL+PEFT ({ours})", ours, "peak_gib", "trl_dpo_lora", ratio_at_most=1.0)
    check("sampling bs1 >= 1000 new tok/s", "ours_generate_bs1", "new_tokens_per_s", at_least=1000)
    for hf in ("hf_inproc_generate_dynamic_bs1", "hf_generate_dynamic_bs1"):
        check(f"sampling bs1 >= 15x HF ({hf})", "ours_generate_bs1", "new_tokens_per_s", hf, ratio_at_least=15)
    for hf in ("hf_inproc_generate_dynamic_bs64", "hf_inproc_generate_static_bs64", "hf_generate_dynamic_bs64",
               "hf_generate_static_bs64"):
        check(f"sampling bs64 >= 5x HF ({hf})", "ours_generate_bs64", "new_tokens_per_s", hf, ratio_at_least=5)
    check("workload (512 prompts x 4) >= 20000 new tok/s, 0.5B", "ours_generate_workload", "new_tokens_per_s",
          at_least=20000)
    for suffix in ("", "_15b"):
        check(f"workload >= 10x HF static batch 64 ({suffix or '_05b'})", f"ours_generate_workload{suffix}",
              "new_tokens_per_s", f"hf_inproc_generate_static_workload{suffix}", ratio_at_least=10)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench.log")
