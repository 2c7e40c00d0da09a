"""What a training run tells the outside world besides metrics.jsonl: live metrics for TensorBoard or Weights &
Biases (`--report-to`), and the model card (README.md) of every exported model or adapter dir.

    require_backend("tensorboard")                                               # before any work
    tracker = open_tracker("tensorboard", out, vars(args), enabled=d.is_main)   # once the run dir is settled
    tracker.log(step, {"loss": 0.69, "lr": 1e-5})
    tracker.close(final_metrics)
    write_model_card(out / "final", title="SFT", base=args.model, data=[("sft.jsonl", 9800)], ...)
"""
import json
import os
import shlex
import sys
from pathlib import Path

from nanoalign.errors import InputError

REPORT_TO = ("none", "tensorboard", "wandb")


class Tracker:
    """--report-to none: JSONL only."""

    def log(self, step, row):
        pass

    def close(self, final=None):
        pass


class TensorBoardTracker(Tracker):
    """Event files in <out>/tensorboard (`tensorboard --logdir runs`); the run's arguments as hyperparameters."""

    def __init__(self, out_dir, config):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        self.config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
        self.writer.add_text("args", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, step, row):
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)

    def close(self, final=None):
        # run_name="." keeps the hparams beside the scalars instead of in a timestamped sub-run
        self.writer.add_hparams(self.config, {f"final/{k}": v for k, v in (final or {}).items()
                                              if isinstance(v, (int, float))}, run_name=".")
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run (project $WANDB_PROJECT or `nanoalign`); WANDB_MODE=offline writes it under <out>/wandb with no
    network, for `wandb sync` later."""

    def __init__(self, out_dir, config):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "nanoalign"), name=Path(out_dir).name,
                              dir=str(out_dir), config=config)

    def log(self, step, row):
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self, final=None):
        self.run.summary.update(final or {})
        self.run.finish()


def require_backend(report_to):
    """InputError (naming the flag and the pip command) when --report-to's package is not installed: the scripts
    call it before any work, and open the tracker once the run dir is settled (rundir.check_settings)."""
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to)
    if package:
        try:
            __import__(package)
        except ImportError:
            raise InputError(f"--report-to {report_to}: the `{package}` package is not installed "
                             f"(pip install {package})") from None


def open_tracker(report_to, out_dir, config, enabled=True):
    """The tracker for --report-to (rank 0: enabled=True); every rank checks the backend is installed.

    Raises:
        InputError: the backend's package is not installed (names the flag and the pip command).
    """
    require_backend(report_to)
    if report_to == "none" or not enabled:
        return Tracker()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}[report_to](out_dir, config)


# -----------------------------------------------------------------------------
# Model card

def command_line(world=1):
    """The command that is running, as it was typed: `python train_sft.py ...`, or torchrun with the world size."""
    launcher = f"torchrun --nproc_per_node={world}" if world > 1 else "python"
    return " ".join([launcher, *map(shlex.quote, sys.argv)])


def _cell(v):
    return f"`{v}`" if v not in (None, "") else "—"


# the settings a reader compares runs by, in this order (those a script has; LoRA ones only when LoRA is on)
KEY_SETTINGS = ["lr", "schedule", "warmup_steps", "min_lr_ratio", "lr_step_every", "lr_step_gamma", "weight_decay",
                "clip", "epochs", "max_steps", "batch_size", "grad_accum", "max_len", "max_prompt_len", "precision",
                "beta", "beta_warmup_steps", "margin_clamp", "loss_type", "label_smoothing", "sft_weight",
                "length_penalty", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "seed"]


def write_model_card(model_dir, *, title, base, data, args, metrics, world=1, steps=None, adapter=False, tags=()):
    """README.md in an exported dir, the card the hub shows: YAML header, base model, data with row counts,
    key hyperparameters, final metrics, the command that ran, and every argument.

    Args:
        data: [(source, rows)]: rows kept per source, and totals such as the held-out split.
        args: the script's arguments as a dict (vars(args)); KEY_SETTINGS of them go in the table.
        metrics: {name: value} of the last step (and last eval); floats shown to 4 significant digits.
        world, steps: processes and optimizer steps of the run (the global batch follows from world).
        adapter: a LoRA adapter dir (library peft) rather than a full model (library transformers).
    """
    lora = args.get("lora", True)
    hyperparameters = {k: args[k] for k in KEY_SETTINGS if k in args and (lora or not k.startswith("lora_"))}
    hyperparameters.update(steps=steps, processes=world,
                           global_batch=args.get("batch_size", 0) * args.get("grad_accum", 1) * world)
    command = command_line(world)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else v  # noqa: E731
    lines = ["---", f"base_model: {base}", f"library_name: {'peft' if adapter else 'transformers'}",
             "tags:", *[f"- {t}" for t in ("nanoalign", *tags)], "---", "", f"# {title}", "",
             f"Trained with nanoalign from `{base}`"
             + (" (a LoRA adapter in PEFT layout; load it on top of the base)." if adapter else "."), "",
             "## Data", "", "| source | rows |", "| --- | --- |",
             *[f"| {_cell(src)} | {rows:,} |" for src, rows in data], "",
             "## Hyperparameters", "", "| setting | value |", "| --- | --- |",
             *[f"| {k} | {_cell(fmt(v))} |" for k, v in hyperparameters.items()], "",
             "## Final metrics", "", "| metric | value |", "| --- | --- |",
             *[f"| {k} | {fmt(v)} |" for k, v in metrics.items()], "",
             "## Command", "", "```bash", command, "```", "",
             "<details><summary>every argument</summary>", "", "```json", json.dumps(args, indent=2, default=str),
             "```", "", "</details>", ""]
    path = Path(model_dir) / "README.md"
    path.write_text("\n".join(lines))
    return path
