"""Training curves and win rates as PNG figures, with matplotlib (an optional extra: pip install nanoalign[plot]).

    python -m nanoalign.plot runs/sft runs/dpo runs/dpo2 --out curves.png    # any runs' metrics.jsonl, side by side
    python -m nanoalign.plot runs/dpo runs/dpo2 --winrates runs/eval_*        # plus a win-rate figure from summaries

One panel per metric group a run logged (loss, reward accuracy, reward margin, chosen/rejected log-probs); each
run is one colour, eval curves dashed (rejected log-probs dotted). Falling chosen log-probs (PITFALLS #8) show up
in the last panel.
"""
import argparse
import json
import math
from pathlib import Path

# (panel title, [(metric key, line style, legend suffix)]): a panel is drawn when any run has one of its keys
PANELS = [
    ("loss", [("loss", "-", ""), ("eval_loss", "--", " eval")]),
    ("reward accuracy", [("reward_acc", "-", ""), ("eval_reward_acc", "--", " eval")]),
    ("reward margin", [("reward_margin", "-", ""), ("eval_reward_margin", "--", " eval")]),
    ("log-probs: chosen (solid), rejected (dotted)", [("chosen_logps", "-", " chosen"),
                                                      ("rejected_logps", ":", " rejected")]),
]
INSTALL_HINT = "matplotlib is not installed: pip install 'nanoalign[plot]' (or pip install matplotlib)"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed).

    Raises:
        ImportError: matplotlib is missing (the message says how to install it).
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_metrics(run_dir):
    """The rows of <run_dir>/metrics.jsonl (a run dir or the file itself)."""
    path = Path(run_dir)
    path = path if path.suffix == ".jsonl" else path / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is {run_dir} a training run's --out?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(run_dirs, path, labels=None, dpi=100):
    """Training curves of the runs side by side, one panel per metric group any of them logged; returns path."""
    plt = pyplot()
    runs = [(label, read_metrics(d)) for label, d in zip(labels or [Path(d).name for d in run_dirs], run_dirs)]
    # SFT losses (~1-3 nats) and DPO losses (ln 2 and below) get a panel each, so neither is squashed flat
    kinds = {label: "DPO" if any("reward_acc" in r for r in rows) else "SFT" for label, rows in runs}
    panels = [(f"{kind} {title}", lines, [run for run in runs if kinds[run[0]] == kind])
              for title, lines in PANELS[:1] for kind in ("SFT", "DPO")]
    panels += [(title, lines, runs) for title, lines in PANELS[1:]]
    panels = [p for p in panels if any(k in row for _, rows in p[2] for row in rows for k, _, _ in p[1])]
    cols = min(len(panels), 3) or 1
    rows = math.ceil(len(panels) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    colour = {label: f"C{i}" for i, (label, _) in enumerate(runs)}
    for ax, (title, lines, panel_runs) in zip(axes.flat, panels):
        for label, metrics in panel_runs:
            for key, style, suffix in lines:
                points = [(r["step"], r[key]) for r in metrics if key in r and r[key] is not None]
                if points:
                    ax.plot(*zip(*points), style, color=colour[label], label=label + suffix,
                            marker="o" if len(points) < 20 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def plot_winrates(summaries, path, dpi=100):
    """Win rates with their 95% intervals as a horizontal error-bar chart, 0.5 marked; returns path.

    Args:
        summaries: {name: eval_winrate.py's summary.json dict (win_rate, ci95, wins, losses, ties)}.
    """
    plt = pyplot()
    names = list(summaries)
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(names) + 1.4))
    for y, name in enumerate(names):
        s = summaries[name]
        low, high = s["ci95"]
        ax.errorbar(s["win_rate"], y, xerr=[[s["win_rate"] - low], [high - s["win_rate"]]], fmt="o", capsize=4,
                    color=f"C{y}")
        ax.annotate(f"{s['win_rate']:.3f} [{low:.3f}, {high:.3f}]  {s['wins']}W/{s['losses']}L/{s['ties']}T",
                    (s["win_rate"], y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax.axvline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(-0.6, len(names) - 0.2)
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate (ties excluded), 95% Wilson interval")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="training run dirs (each with a metrics.jsonl)")
    parser.add_argument("--labels", default=None, help="comma-separated legend names (default: the dir names)")
    parser.add_argument("--out", default="curves.png", help="PNG of the training curves")
    parser.add_argument("--winrates", nargs="*", default=[], help="eval_winrate.py --out dirs (their summary.json)")
    parser.add_argument("--winrates-out", default="winrates.png")
    parser.add_argument("--dpi", type=int, default=100, help="pixels per inch (a 5 x 3.4 in panel is 500 x 340 at 100)")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(args.runs):
        parser.error(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    try:
        print(plot_runs(args.runs, args.out, labels, args.dpi))
        if args.winrates:
            summaries = {}
            for d in args.winrates:
                s = json.loads((Path(d) / "summary.json").read_text())
                summaries[f"{s['name_a']} vs {s['name_b']}"] = s
            print(plot_winrates(summaries, args.winrates_out, args.dpi))
    except (ImportError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
