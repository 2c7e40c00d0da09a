"""Synthetic preferences: N samples per prompt, each scored by a reward model; (best, worst) kept when the gap is big enough.

    python gen_synthetic.py --model runs/sft/final --adapter runs/dpo/final \
        --prompts HuggingFaceH4/ultrafeedback_binarized --prompts-split train_gen --max-prompts 2000 \
        --reward Skywork/Skywork-Reward-V2-Qwen3-0.6B --n 4 --min-gap 0.5 --out runs/synth
    # score with an OpenAI-compatible reward endpoint instead (key read from $NVIDIA_API_KEY):
    python gen_synthetic.py ... --reward https://integrate.api.nvidia.com/v1 --reward-model nvidia/llama-3.1-nemotron-70b-reward

Writes <out>/samples.jsonl (every scored completion, appended as it goes), <out>/pairs.jsonl (prompt, chosen,
rejected, scores: train_dpo.py reads it) and <out>/summary.json. Killed and restarted with the same arguments, it
skips the prompts already done; a failing reward endpoint stops it after its retries with everything so far on disk.
Keep generation prompts apart from eval prompts (UltraFeedback: train_gen here, test_gen in eval_winrate.py).
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from nanoalign.chat import load_chat
from nanoalign.data import prompt_records, read_records
from nanoalign.errors import InputError
from nanoalign.jsonl import ResumableJsonl, write_jsonl
from nanoalign.lora import load_merged
from nanoalign.preferences import best_worst_pair
from nanoalign.reward import RewardServerError, load_reward, prompt_check
from nanoalign.sampling import generate
from nanoalign.train import DTYPES, Progress, choose_precision, one_line_errors

# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True, help="policy: HF model dir or hub id")
parser.add_argument("--adapter", action="append", default=[], help="LoRA adapter(s) on top, in order (repeatable)")
parser.add_argument("--tokenizer", default=None, help="default: --model")
parser.add_argument("--prompts", default="HuggingFaceH4/ultrafeedback_binarized", help="prompt source: file, dir or hub id")
parser.add_argument("--prompts-split", default="train_gen")
parser.add_argument("--prompts-config", default=None)
parser.add_argument("--max-prompts", type=int, default=0, help="use the first this-many prompts (0 = all)")
parser.add_argument("--max-prompt-len", type=int, default=1024, help="prompts keep their last this-many tokens")
parser.add_argument("--n", type=int, default=4, help="samples per prompt")
parser.add_argument("--temperature", type=float, default=0.8)
parser.add_argument("--top-p", type=float, default=0.95)
parser.add_argument("--top-k", type=int, default=0)
parser.add_argument("--max-new-tokens", type=int, default=256)
parser.add_argument("--batch-size", type=int, default=16, help="prompts per round of sampling and scoring")
parser.add_argument("--reward", default="Skywork/Skywork-Reward-V2-Qwen3-0.6B",
                    help="`toy` (rule-based), an http(s) URL (OpenAI-compatible endpoint), or a reward model dir / hub id")
parser.add_argument("--reward-model", default="nvidia/llama-3.1-nemotron-70b-reward", help="model name at the endpoint")
parser.add_argument("--reward-batch-size", type=int, default=8)
parser.add_argument("--reward-retries", type=int, default=4, help="http reward: retries of a failed request (5xx, 429, timeout)")
parser.add_argument("--reward-timeout", type=float, default=60, help="http reward: seconds per request")
parser.add_argument("--reward-concurrency", type=int, default=8, help="http reward: requests in flight")
parser.add_argument("--min-gap", type=float, default=0.0, help="keep a pair only if best - worst score >= this")
parser.add_argument("--drop-empty", action="store_true", help="never use an empty completion in a pair")
parser.add_argument("--drop-truncated", action="store_true", help="never use a completion cut at --max-new-tokens")
parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                    help="dtype of the policies and a local reward model (default: bf16 on a GPU with bf16, else fp32)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", required=True)
parser.add_argument("--device", default=None)
args = parser.parse_args()
one_line_errors(RewardServerError)
if not (args.temperature >= 0 and args.top_k >= 0 and 0 < args.top_p <= 1):
    raise InputError(f"need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1, got {args.temperature}, "
                     f"{args.top_k}, {args.top_p}")
# -----------------------------------------------------------------------------

device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
args.precision = choose_precision(args.precision, device)
out = Path(args.out)
# checked before anything is loaded or sampled: a prompt the reward cannot grade fails now, named by file:line
prompts = prompt_records(read_records(args.prompts, args.prompts_split, args.prompts_config), args.max_prompts,
                         check=prompt_check(args.reward))

# resume: prompts with all n samples on disk are done; a prompt with fewer (killed mid-way) is redone
samples = ResumableJsonl(out / "samples.jsonl")
count = defaultdict(int)
for row in samples.rows:
    count[row["prompt_id"]] += 1
done = {pid for pid, c in count.items() if c >= args.n}
if len(done) != len(count):
    samples.rewrite([row for row in samples.rows if row["prompt_id"] in done])
todo = [(pid, messages) for pid, messages in prompts if pid not in done]
print(f"{len(prompts)} prompts: {len(done)} done before, {len(todo)} to sample")

if todo:
    dtype = DTYPES[args.precision]
    model = load_merged(args.model, args.adapter, dtype=dtype, device=device)
    chat = load_chat(args.tokenizer or args.model)
    reward = load_reward(args.reward, device=device, dtype=dtype, batch_size=args.reward_batch_size,
                         model=args.reward_model, cache_path=out / "reward_cache.jsonl", retries=args.reward_retries,
                         timeout=args.reward_timeout, concurrency=args.reward_concurrency)
    progress = Progress(len(todo), "prompts")
    for start in range(0, len(todo), args.batch_size):
        chunk = todo[start:start + args.batch_size]
        prompt_ids = [chat.render_prompt(messages)[-args.max_prompt_len:] for _, messages in chunk]
        outputs = generate(model, [p for p in prompt_ids for _ in range(args.n)], args.max_new_tokens,
                           chat.stop_ids, chat.pad_id, args.temperature, args.top_k, args.top_p,
                           seed=args.seed + len(done) + start, vocab_limit=chat.vocab_size)
        texts = [chat.decode(o) for o in outputs]
        conversations = [messages for _, messages in chunk for _ in range(args.n)]
        scores = reward.score(conversations, texts, ids=[pid for pid, _ in chunk for _ in range(args.n)])
        samples.append([dict(prompt_id=pid, prompt=messages, sample=k, response=texts[i * args.n + k],
                             score=scores[i * args.n + k], n_tokens=len(outputs[i * args.n + k]),
                             finished=bool(outputs[i * args.n + k]) and outputs[i * args.n + k][-1] in chat.stop_ids)
                        for i, (pid, messages) in enumerate(chunk) for k in range(args.n)])
        progress.update(len(chunk))
    progress.close()

# pairs are a pure function of the samples on disk, so they are rebuilt whole on every run
by_prompt = defaultdict(list)
for row in samples.rows:
    by_prompt[row["prompt_id"]].append(row)
pairs, dropped = [], defaultdict(int)
for pid, group in by_prompt.items():
    usable = [s for s in group if not (args.drop_empty and not s["response"].strip())
              and not (args.drop_truncated and not s["finished"])]
    dropped["unusable_samples"] += len(group) - len(usable)
    pair = best_worst_pair(usable, args.min_gap)
    if pair is None:
        dropped["prompts_below_gap"] += 1
        continue
    best, worst = pair
    pairs.append(dict(prompt_id=pid, prompt=group[0]["prompt"], chosen=best["response"], rejected=worst["response"],
                      score_chosen=best["score"], score_rejected=worst["score"]))
write_jsonl(out / "pairs.jsonl", pairs)
scores = [s["score"] for s in samples.rows]
summary = dict(prompts=len(by_prompt), samples=len(samples.rows), pairs=len(pairs), **dropped,
               mean_score=sum(scores) / max(len(scores), 1),
               truncated=sum(not s["finished"] for s in samples.rows), empty=sum(not s["response"].strip() for s in samples.rows))
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary))
