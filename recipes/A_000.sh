#!/usr/bin/env bash
# A (000): full SFT on SmolTalk -> LoRA DPO on UltraFeedback -> two rounds of 400 self-generated pairs labelled by
# Nemotron-70B, a new LoRA stacked each round -> pairwise win rates on 400 UF test prompts. 3x RTX 4090, FP16 + GC.
source "$(dirname "$0")/common.sh"
GPUS=3
sft --model "$BASE" --data "$SFT_DATA" --data-config all --out "$OUT/sft" --max-len 1280 --epochs 0.5 \
    --lr 5e-6 --weight-decay 0.01 --clip 1.0 --schedule linear --warmup-steps 100 --batch-size 2 --precision fp16 --grad-ckpt
LORA=(--lora-r 8 --lora-alpha 16 --lora-dropout 0.05 --beta 0.1 --lr 1e-6 --schedule step --lr-step-every 0.2
      --lr-step-gamma 0.5 --epochs 3 --batch-size 2 --grad-accum 8 --max-len 1280 --max-prompt-len 256
      --eval-every 500 --precision fp16 --grad-ckpt)
dpo --model "$OUT/sft/final" --data "$PREFS" --data-split train_prefs --out "$OUT/dpo" "${LORA[@]}"
SAMPLE=(--prompts "$GEN_PROMPTS" --prompts-split train_gen --max-prompts 400 --num-samples 2 --temperature 0.7 --top-p 0.95)
synth --model "$OUT/sft/final" --adapter "$OUT/dpo/final" --out "$OUT/synth1" "${SAMPLE[@]}"
dpo --model "$OUT/sft/final" --adapter "$OUT/dpo/final" --data "$OUT/synth1/pairs.jsonl" --out "$OUT/ext1" "${LORA[@]}"
synth --model "$OUT/sft/final" --adapter "$OUT/dpo/final" --adapter "$OUT/ext1/final" --out "$OUT/synth2" "${SAMPLE[@]}"
dpo --model "$OUT/sft/final" --adapter "$OUT/dpo/final" --adapter "$OUT/ext1/final" --data "$OUT/synth2/pairs.jsonl" \
    --out "$OUT/ext2" "${LORA[@]}"
EVAL=(--prompts "$EVAL_PROMPTS" --prompts-split test_gen --max-prompts 400)
winrate --model-a "$OUT/sft/final" --adapter-a "$OUT/dpo/final" --name-a dpo --model-b "$OUT/sft/final" --name-b sft \
    --out "$OUT/eval_dpo_vs_sft" "${EVAL[@]}"
winrate --model-a "$OUT/sft/final" --adapter-a "$OUT/dpo/final" --adapter-a "$OUT/ext1/final" --adapter-a "$OUT/ext2/final" \
    --name-a ext --model-b "$OUT/sft/final" --adapter-b "$OUT/dpo/final" --name-b dpo --out "$OUT/eval_ext_vs_dpo" "${EVAL[@]}"
