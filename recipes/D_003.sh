#!/usr/bin/env bash
# D (003): SFT on ~100K SmolTalk conversations (lr 1e-5, warmup 500, wd 0.01, batch 16, 3 epochs) -> DPO on all of
# UltraFeedback from SFT with beta 1.0 and the pre-trained model as reference (2 epochs) -> win rate and mean reward
# vs SFT on 2,000 UF test prompts. With PAIR_WRITER_URL=https://api.openai.com/v1 also D's 0-shot GPT-4o pairs: 2,000
# JSON pairs added to UltraFeedback for a second DPO run (the first 2,000 UF prompts, not those where SFT scored low).
source "$(dirname "$0")/common.sh"
GPUS=1
sft --model "$BASE" --data "$SFT_DATA" --data-config all --out "$OUT/sft" --lr 1e-5 --weight-decay 0.01 \
    --schedule linear --warmup-steps 500 --batch-size 16 --epochs 3
dpo --model "$OUT/sft/final" --ref "$BASE" --data "$PREFS" --data-split train_prefs --out "$OUT/dpo" --beta 1.0 \
    --lr 1e-5 --weight-decay 0.01 --schedule linear --warmup-steps 500 --batch-size 16 --epochs 2
winrate --model-a "$OUT/sft/final" --adapter-a "$OUT/dpo/final" --name-a dpo --model-b "$OUT/sft/final" --name-b sft \
    --prompts "$EVAL_PROMPTS" --prompts-split test_gen --max-prompts 2000 --out "$OUT/eval_dpo_vs_sft"
if [[ -n "${PAIR_WRITER_URL:-}" ]]; then
    pairwriter --model "${PAIR_WRITER_MODEL:-gpt-4o}" --prompts "$GEN_PROMPTS" --prompts-split train_gen \
        --max-prompts 2000 --out "$OUT/gpt_pairs"
    dpo --model "$OUT/sft/final" --ref "$BASE" --data "$OUT/gpt_pairs/pairs.jsonl" --data "$PREFS" \
        --data-split train_prefs --out "$OUT/dpo_gpt" --beta 1.0 --lr 1e-5 --weight-decay 0.01 --schedule linear \
        --warmup-steps 500 --batch-size 16 --epochs 2
    winrate --model-a "$OUT/sft/final" --adapter-a "$OUT/dpo_gpt/final" --name-a dpo_gpt --model-b "$OUT/sft/final" \
        --name-b sft --prompts "$EVAL_PROMPTS" --prompts-split test_gen --max-prompts 2000 --out "$OUT/eval_dpo_gpt_vs_sft"
fi
