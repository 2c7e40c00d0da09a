#!/usr/bin/env bash
# E (004): SFT on smol-smoltalk (97/3 split, 512 tokens, lr 1e-4) -> LoRA DPO on UltraFeedback with beta 0.015 ramped
# over 100 steps, margin clamped at 20, lr 5e-6 cosine, ~2,000 steps -> SFT samples on 10% of UF prompts, near-duplicate
# pairs dropped, added to UF, DPO rerun from SFT -> win rate vs Qwen2.5-0.5B-Instruct on 500 UF prompts. 1x A100, bf16.
source "$(dirname "$0")/common.sh"
GPUS=1
sft --model "$BASE" --data "$SFT_DATA" --out "$OUT/sft" --eval-frac 0.03 --max-len 512 --lr 1e-4 --precision bf16
DPO=(--beta 0.015 --beta-warmup-steps 100 --margin-clamp 20 --lr 5e-6 --schedule cosine --max-steps 2000
     --max-len 512 --max-prompt-len 256 --eval-frac 0.02 --precision bf16)
dpo --model "$OUT/sft/final" --data "$PREFS" --data-split train_prefs --out "$OUT/dpo" "${DPO[@]}"
synth --model "$OUT/sft/final" --prompts "$GEN_PROMPTS" --prompts-split train_gen --max-prompts 6100 \
    --max-similarity 0.9 --max-new-tokens 512 --out "$OUT/synth"
dpo --model "$OUT/sft/final" --data "$OUT/synth/pairs.jsonl" --data "$PREFS" --data-split train_prefs \
    --out "$OUT/dpo_sda" "${DPO[@]}"
for run in dpo dpo_sda; do
    winrate --model-a "$OUT/sft/final" --adapter-a "$OUT/$run/final" --name-a "$run" --model-b "$INSTRUCT" \
        --name-b instruct --prompts "$EVAL_PROMPTS" --prompts-split test_gen --max-prompts 500 --max-new-tokens 512 \
        --out "$OUT/eval_${run}_vs_instruct"
done
