#!/usr/bin/env bash
# Every nanoalign GPU benchmark plus the peer baseline, in ONE device call, within ~9 minutes; log in $OUT/bench.log.
#
# Device call (from the repo root, after the one-time setup in bench/RESULTS.md that fills .whl/ and .peer/):
#     run(command="bash bench/run_all.sh", carry=[".whl", ".peer"], timeout_s=600)
# A subset, e.g. for a second call:  bash bench/run_all.sh install sft_compile peer_gen
# CPU smoke test of the script itself (our benches with --tiny, peer steps skipped):
#     BENCH_TINY=1 OUT=/tmp/bench_out bash bench/run_all.sh
#
# Steps, in priority order (each under `timeout`; a step that would start with too little of the budget left is
# skipped and says so): install (carried wheels, if .whl/*.whl exist), env, sft, dpo, gen (ours + HF in-process),
# peer_sft, peer_dpo, reward, sft_real, dpo_real (real-shape SFT packed/padded, UltraFeedback-shaped LoRA DPO),
# sft_compile, peer_gen, memory (bench_memory.py: LoRA DPO memory by phase, ours and TRL + PEFT); gen15 (the generation workload at 1.5B shapes) only when named:
#     bash bench/run_all.sh install env gen gen15
# BENCH_BUDGET_S (default 560) is the whole run's budget.
# Outputs: $OUT/bench.log (everything), $OUT/results.jsonl (the RESULT lines' JSON), and at the end a summary table
# with the goals checked against the peer measured in the same run (bench/summarize.py).
set -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
LOG=$OUT/bench.log
PY=${PYTHON:-python3}
BUDGET=${BENCH_BUDGET_S:-560}
START=$(date +%s)
TINY=()
if [[ -n "${BENCH_TINY:-}" ]]; then TINY=(--tiny); fi
STEPS=("$@")
if (( ${#STEPS[@]} == 0 )); then
  STEPS=(install env sft dpo gen peer_sft peer_dpo reward sft_real dpo_real sft_compile peer_gen memory)
fi

note() { echo "== $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run_step NAME CAP_S MIN_S CMD...: at most CAP_S seconds (and never past the budget); skipped under MIN_S left
run_step() {
  local name=$1 cap=$2 min=$3; shift 3
  local l; l=$(left)
  if (( l < min )); then
    note "SKIP $name: ${l}s of the budget left, needs ~${min}s"
    echo "RESULT {\"case\": \"step_$name\", \"skipped\": \"time budget: ${l}s left\"}" | tee -a "$LOG"
    return
  fi
  local limit=$(( cap < l ? cap : l ))
  note "RUN $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed): $*"
  local t0; t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=$?
  note "END $name rc=$rc after $(( $(date +%s) - t0 ))s$([[ $rc == 124 || $rc == 137 ]] && echo ' (TIMED OUT)')"
}

have_peer() {
  if [[ -n "${BENCH_TINY:-}" ]]; then note "SKIP $1: the peer needs a GPU (BENCH_TINY set)"; return 1; fi
  if [[ ! -f .peer/peer_bench.py ]]; then note "SKIP $1: no .peer/peer_bench.py (see bench/RESULTS.md)"; return 1; fi
  return 0
}

install_wheels() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  else
    echo "no .whl/*.whl: trl/datasets/liger not installed (the peer's SFT/DPO cases will fail)"
  fi
}

show_env() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1 || true
  $PY -c "import sys; sys.path.insert(0, 'bench'); import common; print(common.env_line())"
  git rev-parse --short HEAD 2>/dev/null && git status --short 2>/dev/null | head -20
}

export PY
export -f install_wheels show_env  # `timeout` runs commands, not functions: run these through bash -c

note "run_all: steps ${STEPS[*]} | budget ${BUDGET}s | $(date -u +%FT%TZ)"
for s in "${STEPS[@]}"; do
  case $s in
    install)
      run_step install 120 20 bash -c install_wheels
      if [[ -d /tmp/site ]]; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi ;;
    env)         run_step env 30 5 bash -c show_env ;;
    sft)         run_step sft 150 30 $PY bench/bench_sft.py "${TINY[@]}" --cases "${SFT_CASES:-1024x8,2048x8,2048x8+ckpt}" ;;
    dpo)         run_step dpo 150 30 $PY bench/bench_dpo.py "${TINY[@]}" \
                   --cases "${DPO_CASES:-fp32,fp32+precompute,bf16,bf16+precompute,bf16+drop0}" ;;
    gen)         run_step gen 360 40 $PY bench/bench_generate.py "${TINY[@]}" --peer ;;
    gen15)       run_step gen15 240 60 $PY bench/bench_generate.py "${TINY[@]}" --shape 1.5b --cases workload \
                   --peer --hf-cases workload+static ;;
    reward)      run_step reward 120 30 $PY bench/bench_reward.py "${TINY[@]}" --peer ;;
    sft_real)    run_step sft_real 150 40 $PY bench/bench_sft.py "${TINY[@]}" --seq-len 2048 \
                   --cases "${SFT_REAL_CASES:-real,real+nopack,real+flex,real+varlen}" ;;
    dpo_real)    run_step dpo_real 120 30 $PY bench/bench_dpo.py "${TINY[@]}" --lora-r 16 --lora-alpha 32 \
                   --prompt-len 512 --response-len 512 --cases "${DPO_REAL_CASES:-bf16+real,bf16+precompute+real}" ;;
    sft_compile) run_step sft_compile 200 90 $PY bench/bench_sft.py "${TINY[@]}" --cases "${SFT_COMPILE_CASES:-1024x8+compile}" ;;
    peer_sft)    have_peer peer_sft && run_step peer_sft 180 60 $PY .peer/peer_bench.py sft ;;
    peer_dpo)    have_peer peer_dpo && run_step peer_dpo 180 60 $PY .peer/peer_bench.py dpo ;;
    peer_gen)    have_peer peer_gen && run_step peer_gen 180 70 $PY .peer/peer_bench.py gen ;;
    memory)      run_step memory 200 60 $PY bench/bench_memory.py "${TINY[@]}" --layers 24 \
                   --cases "${MEMORY_CASES:-$([[ -n "${BENCH_TINY:-}" ]] && echo ours,ours+ckpt || echo ours,ours+ckpt,peer,peer+ckpt)}" ;;
    peer_all)    have_peer peer_all && run_step peer_all 480 120 $PY .peer/peer_bench.py all ;;
    *)           note "unknown step $s (install env sft dpo gen gen15 peer_sft peer_dpo reward sft_real dpo_real sft_compile peer_gen memory peer_all)" ;;
  esac
done

grep '^RESULT ' "$LOG" | sed 's/^RESULT //' > "$OUT/results.jsonl"
note "summary ($(( $(date +%s) - START ))s total; every line of $OUT/results.jsonl):"
$PY bench/summarize.py "$OUT/results.jsonl" 2>&1 | tee -a "$LOG"
note "pipeline GPU-hours (bench/pipeline.py):"
$PY bench/pipeline.py --log "$OUT/results.jsonl" 2>&1 | tee -a "$LOG"
