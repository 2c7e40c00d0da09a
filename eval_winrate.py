"""Win rate of model A over model B (or over stored responses) on held-out prompts, judged by a reward model.

    python eval_winrate.py --model-a runs/sft/final --adapter-a runs/dpo/final --name-a dpo \
        --model-b runs/sft/final --name-b sft \
        --prompts HuggingFaceH4/ultrafeedback_binarized --prompts-split test_gen --max-prompts 500 \
        --reward Skywork/Skywork-Reward-V2-Qwen3-0.6B --out runs/eval_dpo_vs_sft
    # against stored answers (JSONL rows with `prompt` or `prompt_id`, and `response`):
    python eval_winrate.py --model-a ... --responses-b instruct_answers.jsonl --name-b qwen2.5-0.5b-instruct ...
    torchrun --nproc_per_node=8 eval_winrate.py ...   # prompts sharded across GPUs, same results

Both sides answer each prompt with the same sampling settings (greedy by default) and are scored by the same
reward. Reported: win rate = wins / (wins + losses), ties counted but excluded; a Wilson 95% interval on it;
the length-controlled win rate (AlpacaEval 2.0's: a logistic fit of the verdicts on tanh(dlen / sd(dlen)), read
at equal length; nanoalign/preferences.py); paired bootstrap 95% intervals of both rates (1,000 resamples of the
prompts, seed 0); mean reward of each side; the margin-weighted win rate; each side's answer lengths in tokens
(mean, median, share empty, share cut at --max-new-tokens). Writes <out>/per_prompt.jsonl (the answers, their
scores, lengths and whether they finished, the verdict; appended as it goes, one part file per rank merged by
rank 0 in prompt order: a restarted run, on any number of GPUs, skips prompts already judged) and
<out>/summary.json. A prompt's answers depend only on (--seed, prompt_id), both sides drawing the same random
numbers. Both answers to a prompt are scored in one reward call, so an answer both sides gave is an exact tie; a
prompt whose answer the reward endpoint refuses (HTTP 400/413/422) is judged "skipped" and counted apart. Values
with nothing to average are null in summary.json.
One run at a time per --out (<out>/.lock); a rerun whose settings differ from those recorded in
<out>/run_settings.json stops (the flags in FREE below, e.g. --max-prompts, --name-*, batch sizes, may change).
"""
import argparse
import time
from pathlib import Path

import torch

from nanoalign.chat import load_chat
from nanoalign.completions import HttpPolicy, PolicyServerError, add_policy_args, policy_from_args
from nanoalign.data import prompt_records, read_records
from nanoalign.endpoint import is_score_or_none
from nanoalign.engine import check_context, generate
from nanoalign.errors import InputError
from nanoalign.jsonl import ShardedJsonl, has_fields, write_json
from nanoalign.lora import load_merged
from nanoalign.model import check_vocab, load_config
from nanoalign.pages import write_eval_report
from nanoalign.preferences import BOOTSTRAP, answer_lengths, length_controlled, win_rate
from nanoalign.reward import (RewardError, RewardServerError, add_reward_args, prompt_check, reward_from_args,
                              unused_reward_flags)
from nanoalign.rundir import add_flags, check_settings, lock_out_dir, settings_from, together
from nanoalign.sampling import add_sampling_args
from nanoalign.train import (DTYPES, Progress, choose_precision, cleanup_distributed, nonneg_float, nonneg_int,
                             one_line_errors, positive_int, print0, random_seed, rate, setup_distributed)

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
parser.add_argument("--max-prompts", type=nonneg_int, default=0)
parser.add_argument("--max-prompt-len", type=positive_int, default=1024)
add_sampling_args(parser, temperature=0.0, top_p=1.0)
parser.add_argument("--batch-size", type=positive_int, default=64,
                    help="prompts per round: sequences decoded together for each side, then scored and written")
parser.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graph for the decode step (CUDA)")
parser.add_argument("--policy-url-a", default=None, help="A's answers from an OpenAI-compatible completions server "
                    "(vLLM/SGLang, base URL …/v1) instead of loading --model-a, which names the model there")
parser.add_argument("--policy-url-b", default=None, help="the same for B (--model-b names the model there)")
add_policy_args(parser, "--policy-url-*")
add_reward_args(parser)
parser.add_argument("--tie-eps", type=nonneg_float, default=0.0, help="|score A - score B| <= this (>= 0) is a tie")
parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                    help="dtype of the policies, and of a local reward model unless --reward-dtype "
                         "(default: bf16 on a GPU with bf16, else fp32)")
parser.add_argument("--seed", type=random_seed, default=0, help="an integer in [0, 2^63 - 1]")
parser.add_argument("--out", required=True)
add_flags(parser)
parser.add_argument("--device", default=None)
# flags that do not change what is computed, free to change between runs (README "Runs that survive"): names, more
# prompts, batch sizes (an answer depends only on the seed and the prompt), clients' limits. Every other one is
# recorded in <out>/run_settings.json
FREE = ["name_a", "name_b", "max_prompts", "batch_size", "eager", "policy_concurrency", "policy_retries",
        "policy_timeout", "reward_batch_size", "reward_retries", "reward_timeout", "reward_concurrency", "out",
        "overwrite", "device"]
args = parser.parse_args()
one_line_errors(RewardServerError, PolicyServerError, RewardError)
if (args.model_b is None) == (args.responses_b is None):
    raise InputError("give exactly one of --model-b and --responses-b")
# -----------------------------------------------------------------------------

d = setup_distributed(args.device)
device = d.device if args.device in (None, "cuda") else torch.device(args.device)  # cuda: this rank's GPU
args.precision = choose_precision(args.precision, device)
out = Path(args.out)
lock_out_dir(out, device)
# every other flag defines the verdicts on disk: recorded, and a rerun with another value stops (README "Runs that
# survive")
check_settings(out, settings_from(args, FREE, unused=unused_reward_flags(args.reward),  # and what is at model paths
                                  files=["model_a", "adapter_a", "model_b", "adapter_b", "responses_b", "tokenizer",
                                         "reward", "reward_tokenizer"]), args.overwrite)
# checked before anything is loaded or sampled: a prompt the reward cannot grade fails now, named by file:line
prompts = prompt_records(read_records(args.prompts, args.prompts_split, args.prompts_config), args.max_prompts,
                         check=prompt_check(args.reward))
# what a verdict row must hold to count as judged, as a fresh one does (a score that is_score refuses is no
# score); a row without it is damaged and its prompt judged again
PER_PROMPT_FIELDS = dict(prompt_id=str, prompt=list, response_a=str, response_b=str, score_a=is_score_or_none,
                         score_b=is_score_or_none, winner=str, tokens_a=int, tokens_b=int, finished_a=bool,
                         finished_b=(bool, type(None)))  # None: a stored --responses-b answer
with together(device):  # every rank has read what is done before any rank writes; an error on one stops all
    judged = ShardedJsonl(out / "per_prompt.jsonl", key=lambda r: r["prompt_id"], rank=d.rank, world=d.world,
                          check=has_fields(PER_PROMPT_FIELDS))
done = {row["prompt_id"] for row in judged.rows}
todo = [(pid, messages) for pid, messages in prompts if pid not in done]
print0(f"{len(prompts)} prompts: {len(done)} judged before, {len(todo)} to go"
       + (f" on {d.world} ranks" if d.world > 1 else ""))
todo = todo[d.rank::d.world]

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
    prompt_ids = [chat.render_prompt(messages)[-args.max_prompt_len:] for _, messages in todo]

    def policy(model, adapters, url):
        """The local model (adapters merged), or the completions server serving it (key from $OPENAI_API_KEY)."""
        if url:
            return policy_from_args(args, url, model, chat.stop_ids, out / "policy_cache.jsonl")
        check_context(load_config(model), max(map(len, prompt_ids)) + args.max_new_tokens)  # before loading it
        local = load_merged(model, adapters, dtype=dtype, device=device)
        check_vocab(chat.vocab_size, local.config, args.tokenizer or args.model_a, model)
        return local
    model_a = policy(args.model_a, args.adapter_a, args.policy_url_a)
    model_b = policy(args.model_b, args.adapter_b, args.policy_url_b) if args.model_b else None
    reward = reward_from_args(args, device, out / "reward_cache.jsonl", dtype)

    def verdict(score_a, score_b):
        if score_a is None or score_b is None:  # an item the reward endpoint refused (see summary's skipped)
            return "skipped"
        return "a" if score_a - score_b > args.tie_eps else "b" if score_b - score_a > args.tie_eps else "tie"

    def answer(model, prompt_ids, ids):
        """[(text, tokens, finished)] per prompt: tokens = the answer's length, its stop token not counted."""
        if isinstance(model, HttpPolicy):  # usage.completion_tokens counts the stop token (vLLM, SGLang)
            return [(text, max(n - finished, 0), finished)
                    for text, n, finished in model.sample(list(zip(prompt_ids, ids)))]
        outputs = generate(model, prompt_ids, args.max_new_tokens, chat.stop_ids, chat.pad_id, args.temperature,
                           args.top_k, args.top_p, seed=args.seed, vocab_limit=chat.vocab_size, keys=ids,
                           compile=False if args.eager else None)
        finished = [bool(o) and o[-1] in chat.stop_ids for o in outputs]
        return [(chat.decode(o), len(o) - f, f) for o, f in zip(outputs, finished)]

    progress = Progress(len(todo), "prompts", enabled=d.is_main, unit="prompts")
    for start in range(0, len(todo), args.batch_size):
        chunk = todo[start:start + args.batch_size]
        ids = [pid for pid, _ in chunk]
        conversations = [messages for _, messages in chunk]
        chunk_ids = prompt_ids[start:start + args.batch_size]
        t0 = time.time()
        answers_a = answer(model_a, chunk_ids, ids)
        if model_b is not None:
            answers_b = answer(model_b, chunk_ids, ids)
        else:  # stored text: its length by our tokenizer, its ending unknown
            answers_b = [(stored[pid], len(chat.encode(stored[pid])), None) for pid in ids]
        t1 = time.time()
        new_tokens = sum(n + f for _, n, f in answers_a + (answers_b if model_b is not None else []))  # stop ids too
        # both sides in one call: an answer both models gave is scored once, an exact tie
        scores = reward.score(conversations * 2, [t for t, _, _ in answers_a + answers_b], ids=ids * 2)
        judged.append([dict(prompt_id=pid, prompt=m, response_a=ta, response_b=tb, score_a=sa, score_b=sb,
                            winner=verdict(sa, sb), tokens_a=na, tokens_b=nb, finished_a=fa, finished_b=fb)
                       for pid, m, (ta, na, fa), (tb, nb, fb), sa, sb in zip(
                           ids, conversations, answers_a, answers_b, scores[:len(chunk)], scores[len(chunk):])])
        progress.update(len(chunk), rate(new_tokens, t1 - t0, "new tok"),
                        rate(2 * len(chunk), time.time() - t1, "scores"))
    progress.close()

order = {pid: i for i, (pid, _) in enumerate(prompts)}
rows = judged.finish(order=lambda r: order.get(r["prompt_id"], len(order)))
cleanup_distributed()
if rows is None:  # rank > 0: rank 0 merges and writes the summary
    raise SystemExit(0)
rows = [row for row in rows if row["prompt_id"] in order]
scored = [r for r in rows if r["winner"] != "skipped"]
summary = dict(name_a=args.name_a, name_b=args.name_b, reward=args.reward, interval="wilson",
               **win_rate([r["score_a"] for r in scored], [r["score_b"] for r in scored], args.tie_eps),
               skipped=len(rows) - len(scored),
               sampling=dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                             max_new_tokens=args.max_new_tokens, seed=args.seed),
               **length_controlled([r["winner"] for r in scored], [r["tokens_a"] - r["tokens_b"] for r in scored]),
               # every answer's length, skipped prompts' too (an endpoint refuses the longest answers first)
               lengths={side: answer_lengths([r[f"response_{side}"] for r in rows], [r[f"tokens_{side}"] for r in rows],
                                             [r[f"finished_{side}"] for r in rows]) for side in ("a", "b")},
               models=dict(a=dict(model=args.model_a, adapters=args.adapter_a, policy_url=args.policy_url_a),
                           b=dict(model=args.model_b, adapters=args.adapter_b, policy_url=args.policy_url_b,
                                  responses=args.responses_b)))
write_json(out / "summary.json", summary)


def show(x, fmt=".3f"):
    return "n/a" if x is None else f"{x:{fmt}}"


def interval(ci):
    return "" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


skipped = f", {summary['skipped']} skipped (refused by the reward endpoint)" if summary["skipped"] else ""
print(f"{args.name_a} vs {args.name_b}: {summary['wins']}W/{summary['losses']}L/{summary['ties']}T of "
      f"{summary['n']}{skipped}; mean reward {show(summary['mean_reward_a'])} vs {show(summary['mean_reward_b'])}")
print(f"  {'':<18} {'rate':>6}  {'95% CI Wilson':<16} 95% CI paired bootstrap ({BOOTSTRAP['resamples']} resamples)")
print(f"  {'win rate':<18} {show(summary['win_rate']):>6}  {interval(summary['ci95']):<16} "
      f"{interval(summary['bootstrap_ci95'])}")
print(f"  {'length-controlled':<18} {show(summary['lc_win_rate']):>6}  {'':<16} {interval(summary['lc_ci95'])}")
print(f"  {'answer tokens':<18} {'mean':>6}  {'median':>6}  {'empty':>6}  cut at --max-new-tokens")
for side, name in (("a", args.name_a), ("b", args.name_b)):
    length = summary["lengths"][side]
    print(f"  {name[:18]:<18} {show(length['mean_tokens'], '.1f'):>6}  {show(length['median_tokens'], 'g'):>6}  "
          f"{show(length['empty_share'], '.1%'):>6}  {show(length['truncated_share'], '.1%')}")
print(f"report: {write_eval_report(out)}")  # every prompt, both answers side by side, in a browser
