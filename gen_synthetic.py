"""Synthetic preferences: N samples per prompt, each scored by a reward model; (best, worst) kept when the gap is big enough.

    python gen_synthetic.py --model runs/sft/final --adapter runs/dpo/final \
        --prompts HuggingFaceH4/ultrafeedback_binarized --prompts-split train_gen --max-prompts 2000 \
        --reward Skywork/Skywork-Reward-V2-Qwen3-0.6B --num-samples 4 --min-gap 0.5 --out runs/synth
    # every GPU of the node, each with the policy and the reward model, prompts sharded across them:
    torchrun --nproc_per_node=8 gen_synthetic.py ... (same flags)
    # score with an OpenAI-compatible reward endpoint instead (key read from $NVIDIA_API_KEY):
    python gen_synthetic.py ... --reward https://integrate.api.nvidia.com/v1 --reward-model nvidia/llama-3.1-nemotron-70b-reward

Writes <out>/samples.jsonl (every scored completion; while running, each rank appends to its own
samples.part<r>-of-<N>.jsonl, merged by rank 0 in prompt order at the end), <out>/pairs.jsonl (prompt, chosen,
rejected, scores, whether each answer finished, their lengths in tokens: train_dpo.py reads it) and
<out>/summary.json (counts, mean score, and pair_lengths: mean chosen vs rejected length, the share of pairs whose
chosen answer is longer, the median difference; pairs whose chosen side is longer teach length). Killed and restarted
with the same arguments (on any number of GPUs), it skips the prompts already done; a failing reward endpoint stops
it after its retries with everything so far on disk. Sample k of a prompt depends only on (--seed, prompt_id, k), so
the files are the same whatever the number of ranks, the --batch-size or the point where a run was resumed.
A sample the reward endpoint refuses (HTTP 400/413/422, e.g. too long) keeps score null, is in no pair, and is
counted as `skipped` in summary.json.
One run at a time per --out (<out>/.lock); a rerun whose settings differ from those recorded in
<out>/run_settings.json stops (the flags in FREE below, e.g. --max-prompts, --min-gap, batch sizes, may change).
Keep generation prompts apart from eval prompts (UltraFeedback: train_gen here, test_gen in eval_winrate.py).
"""
import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from nanoalign.chat import load_chat
from nanoalign.completions import PolicyServerError, add_policy_args, policy_from_args
from nanoalign.data import prompt_records, read_records
from nanoalign.endpoint import is_score_or_none
from nanoalign.engine import Engine, check_context
from nanoalign.jsonl import ShardedJsonl, has_fields, write_json, write_jsonl
from nanoalign.lora import load_merged
from nanoalign.model import check_vocab, load_config
from nanoalign.pages import write_pairs_report
from nanoalign.preferences import best_worst_pair, pair_lengths, text_similarity
from nanoalign.reward import (RewardError, RewardServerError, add_reward_args, prompt_check, reward_from_args,
                              unused_reward_flags)
from nanoalign.rundir import add_flags, check_settings, lock_out_dir, settings_from, together
from nanoalign.sampling import add_sampling_args
from nanoalign.train import (DTYPES, Progress, choose_precision, cleanup_distributed, nonneg_float, nonneg_int,
                             one_line_errors, positive_int, print0, random_seed, rate, setup_distributed, zero_to_one)

# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True, help="policy: HF model dir or hub id")
parser.add_argument("--adapter", action="append", default=[], help="LoRA adapter(s) on top, in order (repeatable)")
parser.add_argument("--tokenizer", default=None, help="default: --model")
parser.add_argument("--prompts", default="HuggingFaceH4/ultrafeedback_binarized", help="prompt source: file, dir or hub id")
parser.add_argument("--prompts-split", default="train_gen")
parser.add_argument("--prompts-config", default=None)
parser.add_argument("--max-prompts", type=nonneg_int, default=0, help="use the first this-many prompts (0 = all)")
parser.add_argument("--max-prompt-len", type=positive_int, default=1024, help="prompts keep their last this-many tokens")
parser.add_argument("--num-samples", type=positive_int, default=4, help="samples per prompt")
add_sampling_args(parser, temperature=0.8, top_p=0.95)
parser.add_argument("--batch-size", type=positive_int, default=16,
                    help="prompts in flight (batch-size x num-samples sequences decoded together) and per round of scoring")
parser.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graph for the decode step (CUDA)")
parser.add_argument("--policy-url", default=None,
                    help="sample from an OpenAI-compatible completions server (vLLM/SGLang) at this base URL (…/v1) "
                         "instead of loading --model; key, if any, from $OPENAI_API_KEY")
parser.add_argument("--policy-model", default=None, help="model name at --policy-url (default: --model)")
add_policy_args(parser, "--policy-url")
add_reward_args(parser)
parser.add_argument("--min-gap", type=nonneg_float, default=0.0, help="keep a pair only if best - worst score >= this")
parser.add_argument("--max-similarity", type=zero_to_one, default=1.0,
                    help="drop a pair whose chosen and rejected are more alike than this, in [0, 1] (cosine of word "
                         "counts; 1 = keep all)")
parser.add_argument("--drop-empty", action="store_true", help="never use an empty completion in a pair")
parser.add_argument("--drop-truncated", action="store_true", default=True,
                    help="never use a completion cut at --max-new-tokens in a pair (the default)")
parser.add_argument("--keep-truncated", dest="drop_truncated", action="store_false",
                    help="use cut completions too (pairs.jsonl marks them *_finished=false: trained without <|im_end|>)")
parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                    help="dtype of the policies, and of a local reward model unless --reward-dtype "
                         "(default: bf16 on a GPU with bf16, else fp32)")
parser.add_argument("--seed", type=random_seed, default=0, help="an integer in [0, 2^63 - 1]")
parser.add_argument("--out", required=True)
add_flags(parser)
parser.add_argument("--device", default=None)
# flags that do not change what is computed, free to change between runs (README "Runs that survive"): more prompts,
# pairs rebuilt from the samples, batch sizes (a sample depends only on the seed, the prompt and its number), clients'
# limits. Every other one is recorded in <out>/run_settings.json
FREE = ["max_prompts", "batch_size", "eager", "policy_concurrency", "policy_retries", "policy_timeout",
        "reward_batch_size", "reward_retries", "reward_timeout", "reward_concurrency", "min_gap", "max_similarity",
        "drop_empty", "drop_truncated", "out", "overwrite", "device"]
args = parser.parse_args()
one_line_errors(RewardServerError, PolicyServerError, RewardError)
if args.num_samples == 1:
    parser.error("--num-samples 1: a pair is the best and the worst of a prompt's samples, so it takes 2 or more")
if args.temperature == 0 or args.top_k == 1:
    parser.error(f"{'--temperature 0' if args.temperature == 0 else '--top-k 1'} with --num-samples "
                 f"{args.num_samples}: greedy decoding gives every sample of a prompt the same answer, so no pair "
                 f"could form")
# -----------------------------------------------------------------------------

d = setup_distributed(args.device)
device = d.device if args.device in (None, "cuda") else torch.device(args.device)  # cuda: this rank's GPU
args.precision = choose_precision(args.precision, device)
out = Path(args.out)
n = args.num_samples
lock_out_dir(out, device)
# every other flag defines the samples on disk: recorded, and a rerun with another value stops (README "Runs that
# survive")
unused = ([] if args.policy_url else ["policy_model"]) + unused_reward_flags(args.reward)
check_settings(out, settings_from(args, FREE, unused=unused,  # models also recorded by what is at their paths
                                  files=["model", "adapter", "tokenizer", "reward", "reward_tokenizer"]), args.overwrite)
# checked before anything is loaded or sampled: a prompt the reward cannot grade fails now, named by file:line
prompts = prompt_records(read_records(args.prompts, args.prompts_split, args.prompts_config), args.max_prompts,
                         check=prompt_check(args.reward))

# resume: prompts with all n samples on disk (any earlier run, any world size) are done; the rest is redone
# what a sample row must hold to count as done, as a fresh one does (a score that is_score refuses, a NaN or
# 1e308 of an older run, is no score); a row without it is damaged and its prompt sampled again
SAMPLE_FIELDS = dict(prompt_id=str, prompt=list, sample=int, response=str, score=is_score_or_none, n_tokens=int,
                     finished=bool)
with together(device):  # every rank has read what is done before any rank writes; an error on one stops all
    samples = ShardedJsonl(out / "samples.jsonl", key=lambda r: (r["prompt_id"], r["sample"]), rank=d.rank,
                           world=d.world, check=has_fields(SAMPLE_FIELDS))
count = defaultdict(int)
for row in samples.rows:
    count[row["prompt_id"]] += row["sample"] < n
done = {pid for pid, c in count.items() if c >= n}
todo = [(pid, messages) for pid, messages in prompts if pid not in done]
print0(f"{len(prompts)} prompts: {len(done & {pid for pid, _ in prompts})} done before, {len(todo)} to sample"
       + (f" on {d.world} ranks" if d.world > 1 else ""))
todo = todo[d.rank::d.world]


def local_samples(prompt_ids):
    """(prompt index, n (text, n_tokens, finished)) as prompts finish, from the policy on this rank's device: the
    engine refills a slot as soon as its row finishes, so rows of any lengths keep every slot busy."""
    model = load_merged(args.model, args.adapter, dtype=dtype, device=device)
    check_vocab(chat.vocab_size, model.config, args.tokenizer or args.model, args.model)
    engine = Engine(model, args.batch_size * n, max(map(len, prompt_ids)) + args.max_new_tokens, chat.stop_ids,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, vocab_limit=chat.vocab_size,
                    compile=False if args.eager else None, pad_id=chat.pad_id)
    requests = ((ids, args.max_new_tokens, (todo[i][0], k)) for i, ids in enumerate(prompt_ids) for k in range(n))
    outputs = defaultdict(dict)
    for number, tokens in engine.stream(requests, seed=args.seed):
        i, k = divmod(number, n)
        outputs[i][k] = (chat.decode(tokens), len(tokens), bool(tokens) and tokens[-1] in chat.stop_ids)
        if len(outputs[i]) == n:
            group = outputs.pop(i)
            yield i, [group[k] for k in range(n)]


def server_samples(prompt_ids):
    """The same from an OpenAI-compatible completions server (--policy-url), --batch-size prompts at a time."""
    policy = policy_from_args(args, args.policy_url, args.policy_model or args.model, chat.stop_ids,
                              out / "policy_cache.jsonl")
    for start in range(0, len(prompt_ids), args.batch_size):
        chunk = range(start, min(start + args.batch_size, len(prompt_ids)))
        answers = policy.sample([(prompt_ids[i], (todo[i][0], k)) for i in chunk for k in range(n)])
        for j, i in enumerate(chunk):
            yield i, answers[j * n:(j + 1) * n]


def score_and_write(ready):
    """Score whole prompts [(prompt index, n (text, n_tokens, finished))] and append them to this rank's part."""
    global sampled_at
    texts = [text for _, answers in ready for text, _, _ in answers]
    conversations = [todo[i][1] for i, _ in ready for _ in range(n)]
    t0 = time.time()
    scores = reward.score(conversations, texts, ids=[todo[i][0] for i, _ in ready for _ in range(n)])
    t1 = time.time()
    samples.append([dict(prompt_id=todo[i][0], prompt=todo[i][1], sample=k, response=text, score=scores[j * n + k],
                         n_tokens=n_tokens, finished=finished)
                    for j, (i, answers) in enumerate(ready) for k, (text, n_tokens, finished) in enumerate(answers)])
    new_tokens = sum(n_tokens for _, answers in ready for _, n_tokens, _ in answers)
    progress.update(len(ready), rate(new_tokens, t0 - sampled_at, "new tok"), rate(len(texts), t1 - t0, "scores"))
    sampled_at = t1


if todo:
    dtype = DTYPES[args.precision]
    chat = load_chat(args.tokenizer or args.model)
    prompt_ids = [chat.render_prompt(messages)[-args.max_prompt_len:] for _, messages in todo]
    if not args.policy_url:  # before any model is loaded
        check_context(load_config(args.model), max(map(len, prompt_ids)) + args.max_new_tokens)
    reward = reward_from_args(args, device, out / "reward_cache.jsonl", dtype)
    progress = Progress(len(todo), "prompts", enabled=d.is_main, unit="prompts")
    sampled_at = time.time()  # the prompts of each score_and_write were sampled since then
    ready = []
    for finished_prompt in (server_samples if args.policy_url else local_samples)(prompt_ids):
        ready.append(finished_prompt)
        if len(ready) == args.batch_size:
            score_and_write(ready)
            ready = []
    if ready:
        score_and_write(ready)
    progress.close()

order = {pid: i for i, (pid, _) in enumerate(prompts)}
rows = samples.finish(order=lambda r: (order.get(r["prompt_id"], len(order)), r["sample"]))
cleanup_distributed()
if rows is None:  # rank > 0: rank 0 merges and writes the pairs
    raise SystemExit(0)

# pairs are a pure function of the samples on disk, so they are rebuilt whole on every run, from the prompts of this
# run only (samples.jsonl keeps those of earlier runs with more prompts, for a later, larger run)
rows = [row for row in rows if row["prompt_id"] in order]
by_prompt = defaultdict(list)
for row in rows:
    by_prompt[row["prompt_id"]].append(row)
pairs, dropped = [], defaultdict(int)
for pid, group in by_prompt.items():
    usable = [s for s in group if s["score"] is not None and not (args.drop_empty and not s["response"].strip())
              and not (args.drop_truncated and not s["finished"])]
    dropped["unusable_samples"] += len(group) - len(usable)
    pair = best_worst_pair(usable, args.min_gap)
    if pair is None:
        dropped["prompts_below_gap"] += 1
        continue
    best, worst = pair
    if text_similarity(best["response"], worst["response"]) > args.max_similarity:
        dropped["pairs_too_similar"] += 1
        continue
    pairs.append(dict(prompt_id=pid, prompt=group[0]["prompt"], chosen=best["response"], rejected=worst["response"],
                      score_chosen=best["score"], score_rejected=worst["score"],
                      chosen_finished=best["finished"], rejected_finished=worst["finished"],
                      # the answers' lengths, their stop token not counted (as eval_winrate.py's tokens_a/b)
                      chosen_tokens=best["n_tokens"] - best["finished"],
                      rejected_tokens=worst["n_tokens"] - worst["finished"]))
write_jsonl(out / "pairs.jsonl", pairs)
scores = [s["score"] for s in rows if s["score"] is not None]  # None: refused by the reward endpoint
summary = dict(prompts=len(by_prompt), samples=len(rows), pairs=len(pairs), **dropped,
               skipped=len(rows) - len(scores), mean_score=sum(scores) / len(scores) if scores else None,
               truncated=sum(not s["finished"] for s in rows), empty=sum(not s["response"].strip() for s in rows),
               pair_lengths=pair_lengths([p["chosen_tokens"] for p in pairs], [p["rejected_tokens"] for p in pairs]))
write_json(out / "summary.json", summary)
print(json.dumps(summary))
print(f"report: {write_pairs_report(out)}")  # every pair beside the prompt's other samples, in a browser
