#!/usr/bin/env bash
# D (003): SFT on ~100K SmolTalk conversations (lr 1e-5, warmup 500, wd 0.01, batch 16, 3 epochs) -> DPO on all of
# UltraFeedback from SFT with beta 1.0 and the pre-trained model as reference (2 epochs) -> win rate and mean reward
# vs SFT on 2,000 UF test prompts. GPT-4o-written pairs: see README (no chat-model pair writer here).
source "$(dirname "$0")/common.sh"
GPUS=1
sft --model "$BASE" --data "$SFT_DATA" --data-config all --out "$OUT/sft" --lr 1e-5 --weight-decay 0.01 \
    --schedule linear --warmup-steps 500 --batch-size 16 --epochs 3
dpo --model "$OUT/sft/final" --ref "$BASE" --data "$PREFS" --data-split train_prefs --out "$OUT/dpo" --beta 1.0 \
    --lr 1e-5 --weight-decay 0.01 --schedule linear --warmup-steps 500 --batch-size 16 --epochs 2
winrate --model-a "$OUT/sft/final" --adapter-a "$OUT/dpo/final" --name-a dpo --model-b "$OUT/sft/final" --name-b sft \
    --prompts "$EVAL_PROMPTS" --prompts-split test_gen --max-prompts 2000 --out "$OUT/eval_dpo_vs_sft"
