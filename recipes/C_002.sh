#!/usr/bin/env bash
# C (002): LoRA SFT (r8 a16, q/v) on 5% of smol-smoltalk -> LoRA DPO on 25% of UltraFeedback (beta 0.2) -> (i) 4
# samples per prompt from the SFT model, Nemotron-70B, best vs worst when the gap is over ~1, mixed into the 25% UF
# -> win rate vs Qwen2.5-0.5B-Instruct on 200 UF test prompts (T 0.7, top-p 0.95, 256 new tokens). One GPU per run.
# With PAIR_WRITER_URL=https://api.openai.com/v1 also (ii): 4,754 GPT-3.5 JSON pairs mixed into the 25% UF the same way.
source "$(dirname "$0")/common.sh"
GPUS=1
LORA=(--lora-r 8 --lora-alpha 16 --lora-dropout 0.05 --lora-targets q_proj,v_proj --grad-ckpt)
# 5% of 460K = 23K conversations x 3 epochs at batch 6 = 11,500 steps (drawn from the whole set: see README)
sft --model "$BASE" --data "$SFT_DATA" --out "$OUT/sft" --lora "${LORA[@]}" --lr 2e-5 --schedule linear \
    --batch-size 6 --max-steps 11500 --seed 30
DPO=(--beta 0.2 --lr 2e-5 --schedule linear --epochs 3 --batch-size 6 --max-len 512 --max-prompt-len 256 "${LORA[@]}")
dpo --model "$BASE" --adapter "$OUT/sft/final" --data "$PREFS" --data-split train_prefs --data-weights 0.25 \
    --out "$OUT/dpo" "${DPO[@]}"
synth --model "$BASE" --adapter "$OUT/sft/final" --prompts "$GEN_PROMPTS" --prompts-split train_gen --max-prompts 15000 \
    --num-samples 4 --min-gap 1.0 --out "$OUT/synth"
dpo --model "$BASE" --adapter "$OUT/sft/final" --data "$OUT/synth/pairs.jsonl" --data "$PREFS" --data-split train_prefs \
    --data-weights 1,0.25 --out "$OUT/dpo_syn" "${DPO[@]}"
RUNS=(dpo dpo_syn)
if [[ -n "${PAIR_WRITER_URL:-}" ]]; then
    pairwriter --model "${PAIR_WRITER_MODEL:-gpt-3.5-turbo}" --prompts "$GEN_PROMPTS" --prompts-split train_gen \
        --max-prompts 4754 --out "$OUT/gpt_pairs"
    dpo --model "$BASE" --adapter "$OUT/sft/final" --data "$OUT/gpt_pairs/pairs.jsonl" --data "$PREFS" \
        --data-split train_prefs --data-weights 1,0.25 --out "$OUT/dpo_gpt" "${DPO[@]}"
    RUNS+=(dpo_gpt)
fi
for run in "${RUNS[@]}"; do
    winrate --model-a "$BASE" --adapter-a "$OUT/sft/final" --adapter-a "$OUT/$run/final" --name-a "$run" \
        --model-b "$INSTRUCT" --name-b instruct --prompts "$EVAL_PROMPTS" --prompts-split test_gen --max-prompts 200 \
        --temperature 0.7 --top-p 0.95 --max-new-tokens 256 --out "$OUT/eval_${run}_vs_instruct"
done
