"""Preference pairs written by an OpenAI-compatible chat model (papers C (ii) and D: GPT-3.5 / GPT-4o asked for
strict JSON with a correct "chosen" and a plausible, deliberately flawed "rejected" answer to each prompt).

    python gen_pairs_chat.py --url https://api.openai.com/v1 --model gpt-4o \
        --prompts HuggingFaceH4/ultrafeedback_binarized --prompts-split train_gen --max-prompts 2000 --out runs/gpt_pairs
    # key, if any, from $OPENAI_API_KEY (--api-key-env names another variable); never a flag

Each prompt is sent once as one user message: --template (a text file; default below) with {prompt} replaced by
the prompt (a multi-turn prompt as "User: ..."/"Assistant: ..." lines). The reply's JSON object (the first "{" to
the last "}", so code fences and chatter around it are fine) must hold two different, non-empty strings "chosen"
and "rejected"; any other reply is dropped and counted in summary.json (not_json, missing_key, same_text; refused:
HTTP 400/413/422). Replies are appended to <out>/chat_cache.jsonl as they arrive, keyed by prompt for this --model
and template: a killed or extended run (a larger --max-prompts) asks only the prompts not yet answered.
Writes <out>/pairs.jsonl (prompt, chosen, rejected, *_finished, source: train_dpo.py reads it, mixable with
gen_synthetic.py's) and <out>/summary.json. One run at a time per --out; other settings than those recorded in
<out>/run_settings.json stop a rerun (the flags in FREE below, e.g. --max-prompts and the client's limits, may change).
"""
import argparse
import json
from pathlib import Path

from nanoalign.data import prompt_records, read_records
from nanoalign.endpoint import ClientError, Endpoint, EndpointError, JsonlCache, sha256
from nanoalign.errors import InputError
from nanoalign.jsonl import write_json, write_jsonl
from nanoalign.rundir import add_flags, check_settings, lock_out_dir, settings_from
from nanoalign.train import Number, nonneg_int, one_line_errors, positive_int, timeout_seconds

TEMPLATE = """Write two answers to the user's message below, for training a model on preferences.
"chosen": a correct, helpful, complete answer, reasoning step by step where that helps.
"rejected": a plausible answer of the same kind and length that is subtly flawed (a wrong fact or step,
a missed part of the request, or a misleading claim), written as if it were correct.
Return only a JSON object with exactly the keys "chosen" and "rejected", both strings, and nothing else.

User's message:
{prompt}"""

parser = argparse.ArgumentParser(description=__doc__ + "\nDefault template:\n\n" + TEMPLATE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--url", required=True, help="base URL of the OpenAI-compatible server (…/v1)")
parser.add_argument("--model", required=True, help="chat model name at --url (e.g. gpt-4o)")
parser.add_argument("--template", default=None, help="text file with {prompt} in it (default: the template below)")
parser.add_argument("--prompts", default="HuggingFaceH4/ultrafeedback_binarized", help="prompt source: file, dir or hub id")
parser.add_argument("--prompts-split", default="train_gen")
parser.add_argument("--prompts-config", default=None)
parser.add_argument("--max-prompts", type=nonneg_int, default=0, help="use the first this-many prompts (0 = all)")
parser.add_argument("--temperature", type=Number(0, 2), default=0.7, help="in [0, 2], as OpenAI's API takes it")
parser.add_argument("--max-tokens", type=positive_int, default=2048, help="reply budget (both answers together)")
parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
parser.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight")
parser.add_argument("--retries", type=nonneg_int, default=4, help="retries of a failed request (5xx, 429, timeout)")
parser.add_argument("--timeout", type=timeout_seconds, default=300,
                    help="seconds per request, all of it; > 0 and at most 1e9")
parser.add_argument("--out", required=True)
add_flags(parser)
# flags that do not change what is computed, free to change between runs (README "Runs that survive"): more prompts,
# the client's limits and key. Every other one is recorded in <out>/run_settings.json
FREE = ["max_prompts", "api_key_env", "concurrency", "retries", "timeout", "out", "overwrite"]
args = parser.parse_args()
one_line_errors(EndpointError)

try:
    template = Path(args.template).read_text(encoding="utf-8") if args.template else TEMPLATE
except UnicodeDecodeError as e:
    raise InputError(f"--template {args.template}: not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
if "{prompt}" not in template:
    raise InputError(f"--template {args.template}: no {{prompt}} in it to put the prompt in")
out = Path(args.out)
endpoint = Endpoint(args.url.rstrip("/") + "/chat/completions", args.api_key_env, args.timeout, args.retries,
                    concurrency=args.concurrency, what="pair writer")
lock_out_dir(out)
# every other flag defines the replies on disk: recorded (the template by its text), and a rerun with another value
# stops (README "Runs that survive")
check_settings(out, settings_from(args, FREE, **{"--template (sha256 of its text)": sha256(template)}), args.overwrite)
prompts = prompt_records(read_records(args.prompts, args.prompts_split, args.prompts_config), args.max_prompts)
cache = JsonlCache(out / "chat_cache.jsonl", ("prompt_id",), dict(model=args.model, template_sha256=sha256(template)),
                   {"content": str})


def prompt_text(messages) -> str:
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def parse_content(body: bytes) -> str:
    try:
        return str(json.loads(body)["choices"][0]["message"]["content"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"no chat reply (choices[0].message.content): {body[:300].decode('utf-8', 'replace')!r}") from None


def ask(item):
    pid, messages = item
    payload = dict(model=args.model, temperature=args.temperature, max_tokens=args.max_tokens,
                   messages=[{"role": "user", "content": template.replace("{prompt}", prompt_text(messages))}])
    try:
        cache.put((pid,), content=endpoint.post(payload, parse_content))
    except ClientError as e:  # this prompt refused (too long, say): recorded, not asked again
        cache.put((pid,), error=str(e))


def parse_pair(content: str):
    """(chosen, rejected) from a reply, or (None, why it is unusable)."""
    try:
        obj = json.loads(content[content.index("{"):content.rindex("}") + 1])
    except ValueError:
        return None, "not_json"
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) and obj[k].strip() for k in ("chosen", "rejected")):
        return None, "missing_key"
    if obj["chosen"].strip() == obj["rejected"].strip():
        return None, "same_text"
    return obj["chosen"], obj["rejected"]


todo = [(pid, messages) for pid, messages in prompts if cache.get((pid,)) is None]
print(f"{len(prompts)} prompts: {len(prompts) - len(todo)} answered before, {len(todo)} to ask {args.model}")
endpoint.map(ask, todo)  # Ctrl-C or a failing endpoint: the replies so far stay in the cache

pairs, dropped = [], dict(not_json=0, missing_key=0, same_text=0, refused=0)
for pid, messages in prompts:
    row = cache.get((pid,))
    chosen, rejected = parse_pair(row["content"]) if row.get("content") is not None else (None, "refused")
    if chosen is None:
        dropped[rejected] += 1
        continue
    pairs.append(dict(prompt_id=pid, prompt=messages, chosen=chosen, rejected=rejected, chosen_finished=True,
                      rejected_finished=True, source=f"chat:{args.model}"))
write_jsonl(out / "pairs.jsonl", pairs)
summary = dict(prompts=len(prompts), asked=len(todo), pairs=len(pairs), **dropped)
write_json(out / "summary.json", summary)
print(json.dumps(summary))
