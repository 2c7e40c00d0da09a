# Sourced by every recipe: where the data and models come from, how the scripts are launched, and --smoke.
#
#   bash recipes/A_000.sh                 # the paper's settings: real Qwen2.5, real datasets, torchrun on $GPUS GPUs
#   bash recipes/A_000.sh --smoke         # (or SMOKE=1) the same commands on the demo's tiny model and toy data, CPU,
#                                         # 2 steps each: checks the recipe runs end to end in seconds
# Environment: OUT (default runs/<recipe>), REWARD (the judge; default the Nemotron-70B reward endpoint, which
# reads $NVIDIA_API_KEY; a local reward model dir or hub id works too), PYTHON (default python).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RECIPE="$(basename "$0" .sh)"
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
SMOKE="${SMOKE:-0}"
PYTHON="${PYTHON:-python}"
OUT="${OUT:-runs/$RECIPE}"
mkdir -p "$OUT"

if [[ "$SMOKE" == 1 ]]; then
    # the demo's tokenizer, tiny random Qwen2 and toy data (nanoalign/demo.py build_assets), judged by the toy rule
    "$PYTHON" -c "import sys; from pathlib import Path; from nanoalign.demo import build_assets
build_assets(Path(sys.argv[1]), n_sft=64, n_pairs=48, n_gen=8, n_eval=8, high=9)" "$OUT/smoke"
    BASE="$OUT/smoke/base"; INSTRUCT="$OUT/smoke/base"
    SFT_DATA="$OUT/smoke/data/sft.jsonl"; PREFS="$OUT/smoke/data/prefs.jsonl"
    GEN_PROMPTS="$OUT/smoke/data/gen_prompts.jsonl"; EVAL_PROMPTS="$OUT/smoke/data/eval_prompts.jsonl"
    REWARD=toy
    # appended after the recipe's own flags, so they win (argparse keeps the last value)
    TRAIN_SMOKE=(--max-steps 2 --batch-size 2 --grad-accum 1 --max-len 128 --precision fp32 --device cpu
                 --save-every 0 --eval-every 0)
    DPO_SMOKE=(--max-prompt-len 96)
    EVAL_SMOKE=(--max-prompts 4 --max-new-tokens 8 --batch-size 4 --precision fp32 --device cpu)
    # a model trained 2 steps answers at random: hot sampling, 4 samples and any gap still make a few pairs
    SYNTH_SMOKE=("${EVAL_SMOKE[@]}" --max-prompts 8 --num-samples 4 --max-new-tokens 32 --temperature 1.0 --top-p 1.0
                 --top-k 0 --min-gap 0 --keep-truncated)  # short answers are cut: keep them
    export OMP_NUM_THREADS=1  # tiny models: thread start-up costs more than the matmuls
    launch() { "$PYTHON" "$ROOT/$1" "${@:2}"; }
else
    BASE=Qwen/Qwen2.5-0.5B; INSTRUCT=Qwen/Qwen2.5-0.5B-Instruct
    SFT_DATA=HuggingFaceTB/smol-smoltalk; PREFS=HuggingFaceH4/ultrafeedback_binarized
    GEN_PROMPTS=HuggingFaceH4/ultrafeedback_binarized; EVAL_PROMPTS=HuggingFaceH4/ultrafeedback_binarized
    REWARD="${REWARD:-https://integrate.api.nvidia.com/v1}"
    TRAIN_SMOKE=(); DPO_SMOKE=(); SYNTH_SMOKE=(); EVAL_SMOKE=()
    launch() { torchrun --standalone --nproc_per_node="${GPUS:-1}" "$ROOT/$1" "${@:2}"; }
fi

sft() { launch train_sft.py "$@" "${TRAIN_SMOKE[@]}"; }
dpo() { launch train_dpo.py "$@" "${TRAIN_SMOKE[@]}" "${DPO_SMOKE[@]}"; }
# sampling and judging run as one process (they shard nothing yet)
synth() { "$PYTHON" "$ROOT/gen_synthetic.py" --reward "$REWARD" "$@" "${SYNTH_SMOKE[@]}"; }
winrate() { "$PYTHON" "$ROOT/eval_winrate.py" --reward "$REWARD" "$@" "${EVAL_SMOKE[@]}"; }
# pairs written by a chat model (C (ii), D), only when $PAIR_WRITER_URL is set (key in $OPENAI_API_KEY)
pairwriter() { "$PYTHON" "$ROOT/gen_pairs_chat.py" --url "$PAIR_WRITER_URL" "$@"; }
