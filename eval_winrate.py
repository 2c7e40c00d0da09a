"""Win rate of model A over model B (or over stored responses) on held-out prompts, judged by a reward model.

    python eval_winrate.py --model-a runs/sft/final --adapter-a runs/dpo/final --name-a dpo \
        --model-b runs/sft/final --name-b sft \
        --prompts HuggingFaceH4/ultrafeedback_binarized --prompts-split test_gen --max-prompts 500 \
        --reward Skywork/Skywork-Reward-V2-Qwen3-0.6B --out runs/eval_dpo_vs_sft
    # against stored answers (JSONL rows with `prompt` or `prompt_id`, and `response`):
    python eval_winrate.py --model-a ... --responses-b instruct_answers.jsonl --name-b qwen2.5-0.5b-instruct ...

Both sides answer each prompt with the same sampling settings (greedy by default) and are scored by the same
reward. Reported: win rate = wins / (wins + losses), ties counted but excluded; a Wilson 95% interval on it;
mean reward of each side; the margin-weighted win rate. Writes <out>/per_prompt.jsonl (appended as it goes:
a restarted run skips prompts already judged) and <out>/summary.json.
"""
import argparse
import json
from pathlib import Path

import torch

from nanoalign.chat import load_chat
from nanoalign.data import prompt_records, read_records
from nanoalign.errors import InputError
from nanoalign.jsonl import ResumableJsonl
from nanoalign.lora import load_merged
from nanoalign.preferences import win_rate
from nanoalign.reward import RewardServerError, load_reward, prompt_check
from nanoalign.sampling import generate
from nanoalign.train import DTYPES, Progress, choose_precision, one_line_errors

# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model-a", required=True, help="HF model dir or hub id")
parser.add_argument("--adapter-a", action="append", default=[], help="LoRA adapter(s) on model A (repeatable)")
parser.add_argument("--name-a", default="A")
parser.add_argument("--model-b", default=None, help="HF model dir or hub id")
parser.add_argument("--adapter-b", action="append", default=[])
parser.add_argument("--responses-b", default=None, help="stored responses for B: JSONL with prompt/prompt_id + response")
parser.add_argument("--name-b", default="B")
parser.add_argument("--tokenizer", default=None, help="default: --model-a (both models must share it)")
parser.add_argument("--prompts", default="HuggingFaceH4/ultrafeedback_binarized")
parser.add_argument("--prompts-split", default="test_gen")
parser.add_argument("--prompts-config", default=None)
parser.add_argument("--max-prompts", type=int, default=0)
parser.add_argument("--max-prompt-len", type=int, default=1024)
parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
parser.add_argument("--top-p", type=float, default=1.0)
parser.add_argument("--top-k", type=int, default=0)
parser.add_argument("--max-new-tokens", type=int, default=256)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--reward", default="Skywork/Skywork-Reward-V2-Qwen3-0.6B", help="`toy`, an http(s) URL, or a reward model")
parser.add_argument("--reward-model", default="nvidia/llama-3.1-nemotron-70b-reward")
parser.add_argument("--reward-batch-size", type=int, default=8)
parser.add_argument("--reward-retries", type=int, default=4, help="http reward: retries of a failed request (5xx, 429, timeout)")
parser.add_argument("--reward-timeout", type=float, default=60, help="http reward: seconds per request")
parser.add_argument("--reward-concurrency", type=int, default=8, help="http reward: requests in flight")
parser.add_argument("--tie-eps", type=float, default=0.0, help="|score A - score B| <= this is a tie")
parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                    help="dtype of the policies and a local reward model (default: bf16 on a GPU with bf16, else fp32)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", required=True)
parser.add_argument("--device", default=None)
args = parser.parse_args()
one_line_errors(RewardServerError)
if (args.model_b is None) == (args.responses_b is None):
    raise InputError("give exactly one of --model-b and --responses-b")
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
judged = ResumableJsonl(out / "per_prompt.jsonl")
done = {row["prompt_id"] for row in judged.rows}
todo = [(pid, messages) for pid, messages in prompts if pid not in done]
print(f"{len(prompts)} prompts: {len(done)} judged before, {len(todo)} to go")

stored = None
if args.responses_b:  # keyed like the prompts: the row's prompt_id, else a hash of its prompt
    stored = {}
    for where, row in read_records(args.responses_b):  # where = "file:line"
        response = row.get("response", row.get("output"))
        if not isinstance(response, str):
            raise InputError(f"{where}: no `response` string in the row")
        stored[str(row["prompt_id"]) if row.get("prompt_id") else prompt_records([(where, row)])[0][0]] = response
    missing = [pid for pid, _ in todo if pid not in stored]
    if missing:
        raise InputError(f"{args.responses_b}: no stored response for {len(missing)} prompts (e.g. {missing[0]})")

if todo:
    chat = load_chat(args.tokenizer or args.model_a)
    dtype = DTYPES[args.precision]
    model_a = load_merged(args.model_a, args.adapter_a, dtype=dtype, device=device)
    model_b = load_merged(args.model_b, args.adapter_b, dtype=dtype, device=device) if args.model_b else None
    reward = load_reward(args.reward, device=device, dtype=dtype, batch_size=args.reward_batch_size,
                         model=args.reward_model, cache_path=out / "reward_cache.jsonl", retries=args.reward_retries,
                         timeout=args.reward_timeout, concurrency=args.reward_concurrency)

    def answer(model, prompt_ids, seed):
        outputs = generate(model, prompt_ids, args.max_new_tokens, chat.stop_ids, chat.pad_id, args.temperature,
                           args.top_k, args.top_p, seed=seed, vocab_limit=chat.vocab_size)
        return [chat.decode(o) for o in outputs]

    progress = Progress(len(todo), "prompts")
    for start in range(0, len(todo), args.batch_size):
        chunk = todo[start:start + args.batch_size]
        ids = [pid for pid, _ in chunk]
        conversations = [messages for _, messages in chunk]
        prompt_ids = [chat.render_prompt(m)[-args.max_prompt_len:] for m in conversations]
        seed = args.seed + len(done) + start
        texts_a = answer(model_a, prompt_ids, seed)
        texts_b = answer(model_b, prompt_ids, seed) if model_b is not None else [stored[pid] for pid in ids]
        scores_a = reward.score(conversations, texts_a, ids=[f"{pid}:a" for pid in ids])
        scores_b = reward.score(conversations, texts_b, ids=[f"{pid}:b" for pid in ids])
        judged.append([dict(prompt_id=pid, prompt=m, response_a=ta, response_b=tb, score_a=sa, score_b=sb,
                            winner="a" if sa - sb > args.tie_eps else "b" if sb - sa > args.tie_eps else "tie")
                       for pid, m, ta, tb, sa, sb in zip(ids, conversations, texts_a, texts_b, scores_a, scores_b)])
        progress.update(len(chunk))
    progress.close()

rows = [row for row in judged.rows if row["prompt_id"] in {pid for pid, _ in prompts}]
summary = dict(name_a=args.name_a, name_b=args.name_b, reward=args.reward, interval="wilson",
               **win_rate([r["score_a"] for r in rows], [r["score_b"] for r in rows], args.tie_eps),
               sampling=dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                             max_new_tokens=args.max_new_tokens, seed=args.seed))
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
low, high = summary["ci95"]
print(f"{args.name_a} vs {args.name_b}: win rate {summary['win_rate']:.3f} [{low:.3f}, {high:.3f}] "
      f"({summary['wins']}W/{summary['losses']}L/{summary['ties']}T of {summary['n']}); "
      f"mean reward {summary['mean_reward_a']:.3f} vs {summary['mean_reward_b']:.3f}")
