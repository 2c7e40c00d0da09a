#!/usr/bin/env bash
# B (001): SFT on SmolTalk -> DPO on all of UltraFeedback; separately, DPO from SFT on synthetic pairs alone (2 samples
# from the base model, T 0.7 top-k 50, Nemotron-70B, best vs worst above a gap) -> both vs SFT on 100 UF prompts.
# Hardware, precision, LoRA and most hyperparameters are not stated: one GPU and the scripts' defaults.
source "$(dirname "$0")/common.sh"
GPUS=1
sft --model "$BASE" --data "$SFT_DATA" --data-config all --out "$OUT/sft"
dpo --model "$OUT/sft/final" --data "$PREFS" --data-split train_prefs --out "$OUT/dpo_uf"
synth --model "$BASE" --prompts "$GEN_PROMPTS" --prompts-split train_gen --max-prompts 5000 --num-samples 2 --temperature 0.7 \
    --top-k 50 --top-p 1.0 --min-gap 0.5 --out "$OUT/synth"
dpo --model "$OUT/sft/final" --data "$OUT/synth/pairs.jsonl" --out "$OUT/dpo_syn"
for run in dpo_uf dpo_syn; do
    winrate --model-a "$OUT/sft/final" --adapter-a "$OUT/$run/final" --name-a "$run" --model-b "$OUT/sft/final" \
        --name-b sft --prompts "$EVAL_PROMPTS" --prompts-split test_gen --max-prompts 100 --out "$OUT/eval_${run}_vs_sft"
done
