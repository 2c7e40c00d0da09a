"""Tokenise once, measured on CPU: tokens/s of building the flat SFT arrays, and memory per rank.

    python bench/bench_tokenize.py                       # 5 M tokens of smol-smoltalk-shaped chats
    python bench/bench_tokenize.py --tokens 100000000    # the issue's 100 M (about 7 GB of disk and RAM for the old way)
    python bench/bench_tokenize.py --tokenizer DIR       # a real tokenizer.json (Qwen2.5's), else a stand-in
    python bench/bench_tokenize.py --tiny                # smoke test

Conversations get lengths from bench/common.SMOLTALK_HIST (assumed shape, see there) and English-like text
(words of the Python standard library's sources). Without --tokenizer the tokenizer is a stand-in: a 32k
byte-level BPE with Qwen2.5's pre-tokenizer regex and chat tokens, trained here on the same kind of text, so
tokens/s is indicative of Qwen2.5's (151k vocab), not equal to it. Each measurement runs in a fresh process:
  build   sft_dataset on an empty cache (what local rank 0 does once): tokens/s, peak RSS
  rank    sft_dataset on the filled cache (every other rank, every rerun): seconds, and memory after touching
          every token: anonymous (the rank's own) vs file pages (the memory-mapped arrays, held once per node
          in the page cache and shared by its ranks)
  lists   the old way, sft_examples' Python lists of ints, held by every rank: bytes a token
One RESULT line per measurement, then the three extrapolated linearly to 100 M tokens (marked as such).
"""
import argparse
import json
import random
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SMOLTALK_HIST, sample_lengths  # noqa: E402

MEASURE = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
from nanoalign.chat import load_chat
from nanoalign.data import read_records, sft_examples
from nanoalign.tokenized import sft_dataset

def memory():  # MiB: resident, and anonymous (the process's own heap; the rest is file pages, e.g. a mmap,
    # which the page cache holds once for all the ranks of a node)
    fields = dict(line.split(":") for line in open("/proc/self/smaps_rollup").read().splitlines()[1:])
    kb = lambda k: int(fields[k].split()[0]) / 1024
    return dict(rss_mib=kb("Rss"), anon_mib=kb("Anonymous"),
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

chat = load_chat({tokenizer!r})
base = memory()
t0 = time.perf_counter()
if {mode!r} == "lists":
    examples, stats = sft_examples(read_records({data!r}), chat, 2048)
    tokens = sum(len(ex["ids"]) for ex in examples)
else:
    ds = sft_dataset({data!r}, "train", None, chat, 2048, "drop", {cache!r})
    tokens = int(ds.offsets[-1])
    assert int(ds.ids.sum(dtype="int64")) >= 0 and int(ds.mask.sum(dtype="int64")) >= 0  # touch every token
dt = time.perf_counter() - t0
m = memory()
print(json.dumps(dict(tokens=tokens, seconds=dt, tokens_per_s=tokens / dt,
                      held_mib=m["rss_mib"] - base["rss_mib"], anon_held_mib=m["anon_mib"] - base["anon_mib"],
                      **m)))
"""


def words():
    """English-like words: identifiers and comment words of the standard library's sources."""
    src = Path(sysconfig.get_paths()["stdlib"])
    text = " ".join(p.read_text(errors="ignore") for p in sorted(src.glob("*.py"))[:200])
    return [w for w in text.replace("\n", " ").split(" ") if w.isascii() and 0 < len(w) < 15]


def stand_in_tokenizer(out_dir, pool):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from nanoalign.toy import QWEN_SPLIT
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32000, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)
    tok.train_from_iterator((" ".join(rng.choices(pool, k=200)) for _ in range(2000)), trainer=trainer)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir


def write_chats(path, n_tokens, pool, seed=0):
    """Conversations whose rendered length follows SMOLTALK_HIST (about 1.3 tokens a word for this text)."""
    rng = random.Random(seed)
    total = 0
    with open(path, "w") as f:
        for length in sample_lengths(SMOLTALK_HIST, n_tokens // 500 + 10, seed):  # mean ~940: enough
            n_words = max(4, int(length / 1.3))
            user = " ".join(rng.choices(pool, k=max(2, n_words // 4)))
            answer = " ".join(rng.choices(pool, k=max(2, n_words - n_words // 4)))
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": answer}]}) + "\n")
            total += length
            if total >= n_tokens:
                return


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=5_000_000, help="approximate tokens of data to make")
    parser.add_argument("--tokenizer", default=None, help="dir with tokenizer.json (default: a 32k stand-in)")
    parser.add_argument("--skip-lists", action="store_true", help="do not measure the old list-of-ints way")
    parser.add_argument("--tiny", action="store_true", help="100k tokens: a smoke test")
    args = parser.parse_args()
    n_tokens = 100_000 if args.tiny else args.tokens
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pool = words()
        tokenizer = args.tokenizer or str(stand_in_tokenizer(tmp / "tok", pool))
        write_chats(tmp / "chats.jsonl", n_tokens, pool)
        results = {}
        for mode in ("build", "rank") + (() if args.skip_lists else ("lists",)):
            code = MEASURE.format(root=str(ROOT), tokenizer=tokenizer, mode=mode, data=str(tmp / "chats.jsonl"),
                                  cache=str(tmp / "cache"))
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            r = results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            r.update(case=f"tokenize_{mode}", tiny=args.tiny, stand_in_tokenizer=args.tokenizer is None)
            print("RESULT " + json.dumps(r), flush=True)
        scale = 100e6 / results["build"]["tokens"]
        extra = dict(case="tokenize_extrapolated_100M", measured_tokens=results["build"]["tokens"],
                     note="linear extrapolation of the measurements above, not a 100M-token run",
                     build_hours=round(results["build"]["seconds"] * scale / 3600, 3),
                     rank_own_mib=round(results["rank"]["anon_held_mib"] * scale, 1),
                     node_page_cache_mib=round((results["rank"]["held_mib"] - results["rank"]["anon_held_mib"]) * scale, 1))
        if "lists" in results:
            extra.update(lists_mib_per_rank=round(results["lists"]["held_mib"] * scale, 1),
                         lists_bytes_per_token=round(results["lists"]["held_mib"] * 2 ** 20 / results["lists"]["tokens"], 1),
            rank_bytes_per_token=round(results["rank"]["held_mib"] * 2 ** 20 / results["rank"]["tokens"], 2))
        print("RESULT " + json.dumps(extra), flush=True)


if __name__ == "__main__":
    main()
