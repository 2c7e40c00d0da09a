"""The whole pipeline, offline, on a CPU, in a few minutes: python -m nanoalign.demo --out runs/demo

Everything is made here, nothing is downloaded: a tokenizer, a tiny random Qwen2 model, and data for the toy task
("what is the largest of these numbers?", graded by a rule). Then the four real scripts run in order, as a user
would run them:

    train_sft.py      on demonstrations that are right, with two habits (70% of the time): questions about the
                      number that comes "last" read literally (the number listed last), and "What is the largest
                      number among ...?" answered in a sentence (half reward); greedy SFT answers keep both
    train_dpo.py      round 1: a short LoRA DPO run on UltraFeedback-style pairs (right answer chosen, a mistake
                      rejected), which never use the wording answered in a sentence
    gen_synthetic.py  8 samples per new prompt from round 1, scored by the rule; a (best, worst) pair only where
                      round 1 is sometimes right and sometimes not (gap >= 0.5)
    train_dpo.py      round 2: a new adapter stacked on round 1's, trained on the synthetic pairs only
    eval_winrate.py   DPO vs SFT and round 2 vs DPO on 1,000 held-out prompts (greedy)

The margins are wide on purpose, so that the conclusions do not hang on one lucky seed or on float differences
between CPUs (README lists three --seed values; --threads changes the scripts' summation order).

It prints a table of win rates (raw and length-controlled), mean rewards and answer lengths and writes
<out>/results.json, and with matplotlib
<out>/curves.png and <out>/winrates.png.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from nanoalign import toy
from nanoalign.chat import load_chat
from nanoalign.jsonl import write_jsonl
from nanoalign.model import CausalLM, ModelConfig, save_model
from nanoalign.pages import write_compare

ROOT = Path(__file__).resolve().parent.parent  # the scripts live beside the package (pip install -e .)
N_EVAL = 1000  # held-out prompts of both win rates
HELD_BACK = toy.TEMPLATES[1]  # "What is the largest number among {}?", answered in a sentence: in no human pair


def build_assets(out: Path, n_sft, n_pairs, n_gen, n_eval, high, seed=0):
    """Tokenizer + random tiny model + the four data files, with eval prompts kept apart from all the others.

    The human pairs never use the wording that SFT answers in a sentence (human data does not cover every prompt);
    the generation and eval prompts use all five wordings: there only round 1's own samples show the better answer."""
    base = out / "base"
    toy.build_tokenizer(base)
    chat = load_chat(base)
    config = toy.tiny_config((chat.vocab_size + 63) // 64 * 64, bos_token_id=chat.endoftext_id,
                             eos_token_id=chat.im_end_id, hidden_size=128, intermediate_size=384)
    save_model(CausalLM(ModelConfig.from_hf(config)).init_weights(seed=seed), base, tokenizer_from=base)

    rng = random.Random(seed)
    eval_prompts = {}
    while len(eval_prompts) < n_eval:
        messages, _ = toy.make_prompt(rng, high)
        eval_prompts[messages[0]["content"]] = None
    fresh = lambda text: text not in eval_prompts  # noqa: E731
    human = [t for t in toy.TEMPLATES if t != HELD_BACK]
    sft = [r for r in (toy.demonstrator(rng, high) for _ in range(n_sft)) if fresh(r["prompt"])]
    pairs = [r for r in (toy.preference_pair(rng, high, human) for _ in range(n_pairs)) if fresh(r["prompt"])]
    gen = {m[0]["content"]: None for m, _ in (toy.make_prompt(rng, high) for _ in range(n_gen))}
    write_jsonl(out / "data/sft.jsonl", sft)
    write_jsonl(out / "data/prefs.jsonl", pairs)
    write_jsonl(out / "data/gen_prompts.jsonl", [{"prompt": p} for p in gen if fresh(p)])
    write_jsonl(out / "data/eval_prompts.jsonl", [{"prompt": p} for p in eval_prompts])
    return base


def run(script, *args, log, threads=1):
    """Run one of the four scripts as a user would; its output goes to <out>/logs/<name>.log."""
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    # tiny models run fastest single-threaded: thread start-up costs more than the matmuls
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    t0 = time.time()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        sys.exit(f"{script} failed (exit {proc.returncode}); see {log}:\n" + "".join(Path(log).read_text().splitlines(True)[-15:]))
    print(f"  {script:<18} {' '.join(map(str, args[:2])):<48} {time.time() - t0:5.1f}s", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta of both rounds")
    parser.add_argument("--dpo-lr", type=float, default=3e-3)
    parser.add_argument("--sft-weight", type=float, default=1.0, help="SFT term of both DPO rounds")
    parser.add_argument("--seed", type=int, default=0, help="data, initial weights, and every script's --seed")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the scripts")
    args = parser.parse_args(argv)
    for script in ("train_sft.py", "train_dpo.py", "gen_synthetic.py", "eval_winrate.py"):
        if not (ROOT / script).exists():
            sys.exit(f"{ROOT / script} not found: run the demo from a source checkout (pip install -e .)")
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    t0 = time.time()
    print(f"nanoalign demo -> {out}")
    base = build_assets(out, n_sft=8000, n_pairs=3000, n_gen=800, n_eval=N_EVAL, high=9, seed=args.seed)

    def step(script, *script_args, log):
        run(script, *script_args, "--seed", args.seed, log=log, threads=args.threads)

    common = ["--precision", "fp32", "--device", "cpu", "--save-every", "0", "--eval-every", "50"]
    sft, dpo, synth, dpo2 = out / "sft", out / "dpo", out / "synth", out / "dpo2"
    step("train_sft.py", "--model", base, "--data", out / "data/sft.jsonl", "--out", sft, "--epochs", 2,
         "--batch-size", 32, "--lr", 3e-3, "--warmup-steps", 10,
         "--max-len", 128, "--no-pack", *common, log=out / "logs/sft.log")  # batches of 32 conversations
    dpo_args = ["--batch-size", 16, "--lr", args.dpo_lr, "--lora-r", 16, "--lora-alpha", 32, "--beta", args.beta,
                "--sft-weight", args.sft_weight, "--warmup-steps", 5, "--max-len", 128, "--max-prompt-len", 96, *common]
    step("train_dpo.py", "--model", sft / "final", "--data", out / "data/prefs.jsonl", "--out", dpo,
         "--max-steps", 60, *dpo_args, log=out / "logs/dpo.log")
    sample_args = ["--reward", "toy", "--max-new-tokens", 8, "--precision", "fp32", "--device", "cpu"]
    # 8 samples per prompt; a pair only where round 1 is sometimes right (1.0) and sometimes not (0.5, 0.1 or 0)
    step("gen_synthetic.py", "--model", sft / "final", "--adapter", dpo / "final", "--prompts",
         out / "data/gen_prompts.jsonl", "--out", synth, "--num-samples", 8, "--temperature", 1.0, "--top-p", 1.0,
         "--min-gap", 0.5, "--drop-empty", *sample_args, log=out / "logs/gen.log")
    step("train_dpo.py", "--model", sft / "final", "--adapter", dpo / "final", "--data", synth / "pairs.jsonl",
         "--out", dpo2, "--max-steps", 100, *dpo_args, log=out / "logs/dpo2.log")
    evals = {"dpo vs sft": ([dpo / "final"], []), "round 2 vs dpo": ([dpo / "final", dpo2 / "final"], [dpo / "final"])}
    results, eval_dirs = {}, []
    for name, (adapters_a, adapters_b) in evals.items():
        eval_out = out / ("eval_" + name.replace(" ", "_"))
        eval_dirs.append(eval_out)
        step("eval_winrate.py", "--model-a", sft / "final", *[x for a in adapters_a for x in ("--adapter-a", a)],
             "--model-b", sft / "final", *[x for a in adapters_b for x in ("--adapter-b", a)],
             "--name-a", name.split(" vs ")[0], "--name-b", name.split(" vs ")[1],
             "--prompts", out / "data/eval_prompts.jsonl", "--out", eval_out, *sample_args,
             log=out / f"logs/{eval_out.name}.log")
        results[name] = json.loads((eval_out / "summary.json").read_text())

    print(f"\n{'held-out prompts':<16} {'win rate':>8} {'95% CI':>15} {'LC rate':>7} {'95% CI':>15} {'W/L/T':>11} "
          f"{'reward A/B':>11} {'tokens A/B':>10}")
    for name, r in results.items():
        ci, lc_ci = ("[{:.3f}, {:.3f}]".format(*c) if c else "n/a" for c in (r["ci95"], r["lc_ci95"]))
        lc = "n/a" if r["lc_win_rate"] is None else f"{r['lc_win_rate']:.3f}"
        wlt = f"{r['wins']}/{r['losses']}/{r['ties']}"
        means = f"{r['mean_reward_a']:.3f}/{r['mean_reward_b']:.3f}"
        tokens = f"{r['lengths']['a']['mean_tokens']:.1f}/{r['lengths']['b']['mean_tokens']:.1f}"
        print(f"{name:<16} {r['win_rate']:>8.3f} {ci:>15} {lc:>7} {lc_ci:>15} {wlt:>11} {means:>11} {tokens:>10}")
    print("(win rate: ties excluded, Wilson interval; LC: length-controlled win rate, paired bootstrap interval;\n"
          " reward: mean reward; tokens: mean answer length)")
    synth_summary = json.loads((synth / "summary.json").read_text())
    lengths = synth_summary["pair_lengths"]
    print(f"synthetic: {synth_summary['pairs']} pairs from {synth_summary['prompts']} prompts "
          f"(mean sample reward {synth_summary['mean_score']:.3f}); chosen/rejected tokens "
          f"{lengths['mean_chosen_tokens']:.2f}/{lengths['mean_rejected_tokens']:.2f}")
    (out / "results.json").write_text(json.dumps(dict(evals=results, synthetic=synth_summary,
                                                      seconds=round(time.time() - t0, 1)), indent=2) + "\n")
    figures = write_figures(out, results)
    print(f"pages: {write_compare(eval_dirs, out / 'compare.html')} "
          "(each comparison's report.html: every prompt's answers side by side)")
    print(f"done in {time.time() - t0:.0f}s: {out / 'results.json'}, {figures}{out}/*/metrics.jsonl")


def write_figures(out: Path, results):
    """curves.png (SFT and both DPO rounds) and winrates.png; without matplotlib, say how to get them and go on."""
    try:
        from nanoalign.plot import plot_runs, plot_winrates
        curves = plot_runs([out / "sft", out / "dpo", out / "dpo2"], out / "curves.png", ["sft", "dpo", "round 2"])
        return f"{curves}, {plot_winrates(results, out / 'winrates.png')}, "
    except ImportError as e:
        print(f"no figures: {e}; then: python -m nanoalign.plot {out}/sft {out}/dpo {out}/dpo2")
        return ""


if __name__ == "__main__":
    main()
