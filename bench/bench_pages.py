"""The HTML reports at eval scale, measured in headless Chromium: file size and time to first render.

    python bench/bench_pages.py                          # 5,000 prompts, answers of a few hundred tokens
    python bench/bench_pages.py --prompts 500 --screenshot docs/eval_report.png   # the README's screenshot

Builds an eval dir (per_prompt.jsonl, summary.json, run_settings.json in the fields eval_winrate.py writes) and a
synthetic dir (samples.jsonl with 4 samples a prompt, pairs.jsonl, summary.json) of fixture data: prompts from a
few templates, answers of English sentences with log-normal lengths (A: median ~300 tokens, B: ~200, cut at 512;
a token counted as 0.75 words), rewards = quality + a length bonus, so the length-controlled rate is below the raw
one. The rates in summary.json are computed from those rows (Wilson; the length model and the paired bootstrap
here are a plain numpy fit for the fixture, not eval_winrate.py's). Then writes both reports and opens each
`--runs` times in Chromium (--headless --dump-dom), reading the page's own mark: performance.now() (real time, from
navigation start) in the callback after the first frame with the first 100 rows laid out and painted. One RESULT line per page: bytes, and the median and range of the marks.
"""
import argparse
import json
import math
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanoalign.jsonl import write_json, write_jsonl  # noqa: E402
from nanoalign.pages import write_eval_report, write_pairs_report  # noqa: E402
from nanoalign.preferences import win_rate  # noqa: E402

CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
PROMPTS = ["How should I approach {t} in a small Python service?", "Explain {t} to a new engineer on my team.",
           "What are the trade-offs of {t}? Give a recommendation.", "Write a short checklist for {t}.",
           "My team argues about {t}. Summarise both sides fairly."]
TOPICS = ["reading a large CSV file", "database indexing", "retrying failed HTTP requests", "code review",
          "feature flags", "caching API responses", "unit tests for legacy code", "logging in production",
          "rate limiting", "schema migrations", "monorepos", "on-call rotations"]
SENTENCES = ["The short answer is that it depends on how much data you have and how often it changes.",
             "Start with the simplest version that works, measure it, and only then optimise the slow part.",
             "A common mistake is to handle every edge case up front instead of the ones you actually see.",
             "Keep the interface small: one function that does one thing is easier to test and to replace.",
             "If you need to process the data in pieces, iterate over it in chunks and keep only a running total.",
             "Write down what success looks like before you begin, so you know when to stop.",
             "Be explicit about failure: decide what happens when the input is missing, malformed or too large.",
             "In practice the cost is rarely the code itself but the time people spend understanding it later.",
             "Here is a concrete example:\n\n    for chunk in read_in_chunks(path, size=10_000):\n        total += process(chunk)"
             "\n\nThat keeps memory flat however large the input is.",
             "Document the decision and the reason for it, so the next person does not have to rediscover it.",
             "Monitoring matters as much as the change: add a metric that tells you whether it is working.",
             "Finally, revisit the choice after a few weeks; what was right at the start may not be right now."]


def answer(rng, topic, tokens):
    """English-like text of about `tokens` tokens (0.75 words a token), with a list now and then."""
    words, parts = int(tokens * 0.75), [f"Good question about {topic}."]
    while sum(len(p.split()) for p in parts) < words:
        s = rng.choice(SENTENCES)
        parts.append(f"\n\n{rng.randint(1, 5)}. {s}" if rng.random() < 0.25 else f" {s}")
    text = "".join(parts).split(" ")
    return " ".join(text[:words]).strip()


def lc_fit(dlen, won, sd):
    """Logistic regression of won on [1, tanh(dlen / sd)] by Newton's method; returns (intercept, slope)."""
    x = np.stack([np.ones_like(dlen), np.tanh(dlen / sd) if sd > 0 else np.zeros_like(dlen)], 1)
    w = np.zeros(2)
    for _ in range(25):
        p = 1 / (1 + np.exp(-x @ w))
        hess = x.T @ (x * (p * (1 - p))[:, None]) + 1e-9 * np.eye(2)
        w += np.linalg.solve(hess, x.T @ (won - p))
    return w


def fake_eval(out: Path, n, seed=0, max_new=512):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        prompt = rng.choice(PROMPTS).format(t=topic)
        ta, tb = (min(max_new, int(rng.lognormvariate(math.log(m), 0.5))) for m in (300, 200))
        ra, rb = answer(rng, topic, ta), answer(rng, topic, tb)
        sa, sb = rng.gauss(0.1, 1) + ta / 250, rng.gauss(0, 1) + tb / 250
        rows.append(dict(prompt_id=f"uf-{i:05d}", prompt=[{"role": "user", "content": prompt}], response_a=ra,
                         response_b=rb, score_a=round(sa, 4), score_b=round(sb, 4),
                         winner="a" if sa > sb else "b", tokens_a=ta, tokens_b=tb, finished_a=ta < max_new,
                         finished_b=tb < max_new))
    write_jsonl(out / "per_prompt.jsonl", rows)
    dlen = np.array([r["tokens_a"] - r["tokens_b"] for r in rows], float)
    won = np.array([r["winner"] == "a" for r in rows], float)
    sd = float(dlen.std())
    b0, b1 = lc_fit(dlen, won, sd)
    boot = np.random.default_rng(0)
    raws, lcs = [], []
    for _ in range(1000):
        k = boot.integers(0, n, n)
        raws.append(won[k].mean())
        lcs.append(1 / (1 + math.exp(-lc_fit(dlen[k], won[k], sd)[0])))
    lengths = {s: dict(mean_tokens=float(np.mean([r[f"tokens_{s}"] for r in rows])),
                       median_tokens=float(np.median([r[f"tokens_{s}"] for r in rows])), empty_share=0.0,
                       truncated_share=sum(not r[f"finished_{s}"] for r in rows) / n) for s in "ab"}
    summary = dict(name_a="dpo", name_b="sft", reward="Skywork/Skywork-Reward-V2-Qwen3-0.6B", interval="wilson",
                   **win_rate([r["score_a"] for r in rows], [r["score_b"] for r in rows]), skipped=0,
                   sampling=dict(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=max_new, seed=0),
                   bootstrap_ci95=list(np.percentile(raws, [2.5, 97.5])), lc_win_rate=1 / (1 + math.exp(-b0)),
                   lc_ci95=list(np.percentile(lcs, [2.5, 97.5])),
                   length_model=dict(intercept=float(b0), slope=float(b1), sd_delta_tokens=sd),
                   bootstrap=dict(resamples=1000, seed=0), lengths=lengths,
                   models=dict(a=dict(model="runs/sft/final", adapters=["runs/dpo/final"], policy_url=None),
                               b=dict(model="runs/sft/final", adapters=[], policy_url=None, responses=None)))
    write_json(out / "summary.json", summary)
    write_json(out / "run_settings.json", {"--model-a": "runs/sft/final", "--adapter-a": ["runs/dpo/final"],
                                           "--model-b": "runs/sft/final", "--prompts": "HuggingFaceH4/ultrafeedback_binarized",
                                           "--prompts-split": "test_gen", "--max-new-tokens": max_new,
                                           "--reward": summary["reward"], "--tie-eps": 0.0, "--seed": 0})
    return write_eval_report(out)


def fake_synthetic(out: Path, n, k=4, seed=0):
    rng = random.Random(seed)
    samples, pairs = [], []
    for i in range(n):
        topic = rng.choice(TOPICS)
        prompt = [{"role": "user", "content": rng.choice(PROMPTS).format(t=topic)}]
        group = []
        for j in range(k):
            tokens = min(512, int(rng.lognormvariate(math.log(250), 0.5)))
            group.append(dict(prompt_id=f"gen-{i:05d}", prompt=prompt, sample=j, response=answer(rng, topic, tokens),
                              score=round(rng.gauss(0, 1) + tokens / 250, 4), n_tokens=tokens + (tokens < 512),
                              finished=tokens < 512))  # n_tokens holds the stop token, *_tokens not
        samples += group
        best, worst = max(group, key=lambda s: s["score"]), min(group, key=lambda s: s["score"])
        pairs.append(dict(prompt_id=best["prompt_id"], prompt=prompt, chosen=best["response"], rejected=worst["response"],
                          score_chosen=best["score"], score_rejected=worst["score"], chosen_finished=best["finished"],
                          rejected_finished=worst["finished"], chosen_tokens=best["n_tokens"] - best["finished"],
                          rejected_tokens=worst["n_tokens"] - worst["finished"]))
    write_jsonl(out / "samples.jsonl", samples)
    write_jsonl(out / "pairs.jsonl", pairs)
    deltas = [p["chosen_tokens"] - p["rejected_tokens"] for p in pairs]
    write_json(out / "summary.json", dict(
        prompts=n, samples=len(samples), pairs=len(pairs), skipped=0,
        mean_score=statistics.mean(s["score"] for s in samples), truncated=sum(not s["finished"] for s in samples),
        empty=0, pair_lengths=dict(mean_chosen_tokens=statistics.mean(p["chosen_tokens"] for p in pairs),
                                   mean_rejected_tokens=statistics.mean(p["rejected_tokens"] for p in pairs),
                                   chosen_longer_share=sum(d > 0 for d in deltas) / len(deltas),
                                   median_delta_tokens=statistics.median(deltas))))
    return write_pairs_report(out)


def first_render_ms(page: Path, profile: Path):
    """Open the page once in a fresh headless Chromium; the page's first-render mark (ms) and the wall time (s)."""
    t0 = time.time()
    dom = subprocess.run(CHROMIUM + [f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
                                    page.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    mark = re.search(r'id="render-ms">(\d+)<', dom)
    assert mark, "no first-render mark in the dumped DOM"
    return int(mark.group(1)), time.time() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=5, help="browser launches per page")
    parser.add_argument("--out", default=None, help="where the fixture dirs go (default: a temporary dir)")
    parser.add_argument("--screenshot", default=None, help="also save a PNG of the eval report (1280 x 1500)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        pages = {"eval": fake_eval(root / "eval", args.prompts), "pairs": fake_synthetic(root / "synth", args.prompts)}
        for name, page in pages.items():
            marks = [first_render_ms(page, Path(tmp) / f"profile{i}") for i in range(args.runs)]
            ms = [m for m, _ in marks]
            print("RESULT " + json.dumps(dict(page=name, prompts=args.prompts, bytes=page.stat().st_size,
                                              first_render_ms_median=statistics.median(ms), first_render_ms=ms,
                                              launch_s_median=round(statistics.median(s for _, s in marks), 2))))
        if args.screenshot:
            subprocess.run(CHROMIUM + [f"--user-data-dir={Path(tmp) / 'shot'}", "--window-size=1280,1500",
                                       "--hide-scrollbars", f"--screenshot={Path(args.screenshot).resolve()}",
                                       pages["eval"].resolve().as_uri()], capture_output=True, timeout=120, check=True)
            print(f"screenshot: {args.screenshot}")


if __name__ == "__main__":
    main()
