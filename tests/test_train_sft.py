"""train_sft.py end to end, run as a user runs it (python / torchrun, gloo on CPU) on the tiny toy setup:
DDP and accumulation give the same weights as one big batch, the loss falls, resume is exact, bad data fails
with the file and line, --help works."""
import math
import random
import shutil

import pytest
import torch
import torch.nn.functional as F

from nanoalign import toy
from nanoalign.chat import load_chat
from nanoalign.data import pack, read_records, sft_examples, split_holdout
from nanoalign.model import load_model
from tests.fixtures import ROOT, cached_toy_setup, check_stopped_on_nan, max_weight_diff, read_metrics, read_weights, run_script, write_jsonl

SCRIPT = "train_sft.py"
FP32 = ("--device", "cpu", "--precision", "fp32")
UNPACKED = ("--no-pack",)  # one conversation a row: batches counted in conversations


@pytest.fixture(scope="session")
def toy_setup(tmp_path_factory):
    return cached_toy_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def varied_sft(tmp_path_factory):
    """SFT rows whose trained-token counts differ a lot (1-digit answers, sentences, two assistant turns), so a
    per-micro-batch or per-rank mean of means (PITFALLS #7) would weight tokens differently from the global mean."""
    rng = random.Random(1)
    rows = []
    for i in range(16):
        row = toy.sft_demo(rng)
        if i % 3 == 1:
            row["messages"][-1]["content"] = " ".join(rng.sample(toy.CHAT_SENTENCES, 3))
        elif i % 3 == 2:
            row["messages"] += [{"role": "user", "content": rng.choice(toy.CHAT_SENTENCES)},
                                {"role": "assistant", "content": rng.choice(toy.CHAT_SENTENCES)}]
        rows.append(row)
    return write_jsonl(tmp_path_factory.mktemp("varied") / "sft.jsonl", rows)


def train(toy_setup, data, out, *args, nproc=1):
    run_script(SCRIPT, "--model", toy_setup.model, "--data", data, "--out", out, *FP32, *args, nproc=nproc)
    return read_metrics(out)


def test_ddp_and_accumulation_match_one_big_batch(toy_setup, varied_sft, tmp_path):
    """Global batch of 4 conversations, split four ways: the same loss, grad norm, eval loss and final weights.
    (A per-micro-batch mean of means moves the weights ~4e-3 here; float noise ~1e-6.) 5 held-out conversations:
    two ranks evaluate 3 and 2 of them, and the eval loss is still that of one process over all 5."""
    common = ("--max-steps", 3, "--lr", 1e-3, "--eval-frac", 0.3, "--eval-every", 0, "--save-every", 0, *UNPACKED)
    splits = {  # name: (processes, batch size, accumulation steps)
        "1x4": (1, 4, 1), "ddp 2x2": (2, 2, 1), "1x2 accum 2": (1, 2, 2), "ddp 2x1 accum 2": (2, 1, 2)}
    runs = {name: train(toy_setup, varied_sft, tmp_path / str(i), "--batch-size", b, "--grad-accum", k, *common,
                        nproc=n) for i, (name, (n, b, k)) in enumerate(splits.items())}
    ref = runs["1x4"]
    assert [r["step"] for r in ref] == [1, 2, 3]
    # micro-batches hold very different numbers of trained tokens, so a mean of means would weight them wrongly
    assert len({r["trained_tokens"] for r in ref}) > 1
    for name, rows in runs.items():
        assert [r["trained_tokens"] for r in rows] == [r["trained_tokens"] for r in ref], name
        for r, r_ref in zip(rows, ref):
            assert r["loss"] == pytest.approx(r_ref["loss"], abs=1e-5), (name, r["step"])
            assert r["grad_norm"] == pytest.approx(r_ref["grad_norm"], rel=1e-4), (name, r["step"])
        assert rows[-1]["eval_loss"] == pytest.approx(ref[-1]["eval_loss"], abs=1e-5), name

    for i in range(len(splits)):  # the model card counts every held-out row (not rank 0's 3 x 2 ranks)
        assert "| `(held out for eval loss)` | 5 |" in (tmp_path / str(i) / "final" / "README.md").read_text()
    base = read_weights(toy_setup.model)
    weights = {name: read_weights(tmp_path / str(i) / "final") for i, name in enumerate(splits)}
    assert max_weight_diff(weights["1x4"], base) > 1e-3  # the parameters moved visibly (Adam: ~lr a step)
    for name, w in weights.items():
        assert max_weight_diff(w, weights["1x4"]) < 1e-5, name


def test_packed_rows_match_padded_rows_and_ddp(toy_setup, varied_sft, tmp_path):
    """--pack (the default): the 16 conversations packed into 12 rows of 160 tokens train to the same losses and
    weights as the same conversations padded one a row, in one process and in two (each step is the whole epoch,
    so every run sees the same conversations); and packing computes fewer positions."""
    common = ("--max-steps", 2, "--lr", 1e-3, "--eval-frac", 0, "--save-every", 0, "--max-len", 160)
    examples, _ = sft_examples(read_records(varied_sft), load_chat(toy_setup.model), 160)
    assert len(examples) == 16 and len(pack([len(ex["ids"]) for ex in examples], 160, 0)) == 12
    runs = {"padded": train(toy_setup, varied_sft, tmp_path / "padded", "--batch-size", 16, *common, *UNPACKED),
            "packed": train(toy_setup, varied_sft, tmp_path / "packed", "--batch-size", 12, *common),
            "packed ddp": train(toy_setup, varied_sft, tmp_path / "ddp", "--batch-size", 6, *common, nproc=2)}
    ref = runs["padded"]
    for name, rows in runs.items():
        assert [r["trained_tokens"] for r in rows] == [r["trained_tokens"] for r in ref], name
        for r, r_ref in zip(rows, ref):
            assert r["loss"] == pytest.approx(r_ref["loss"], abs=1e-5), name
            assert r["grad_norm"] == pytest.approx(r_ref["grad_norm"], rel=1e-4), name
    weights = read_weights(tmp_path / "padded" / "final")
    assert max_weight_diff(weights, read_weights(toy_setup.model)) > 1e-4
    for name in ("packed", "ddp"):
        assert max_weight_diff(read_weights(tmp_path / name / "final"), weights) < 1e-5, name


def test_loss_goes_down_and_metrics(toy_setup, tmp_path):
    steps, lr, batch = 42, 3e-3, 8
    rows = train(toy_setup, toy_setup.sft, tmp_path / "out", "--max-steps", steps, "--lr", lr, "--batch-size", batch,
                 "--eval-frac", 0.125, "--eval-every", 0, "--save-every", 0, *UNPACKED)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    keys = {"step", "loss", "lr", "grad_norm", "trained_tokens", "tokens_per_s"}
    assert all(set(r) == keys for r in rows[:-1]) and set(rows[-1]) == keys | {"eval_loss"}
    # cosine from lr to 0 over `steps`, read before each step
    for r in rows:
        assert r["lr"] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (r["step"] - 1) / steps)), abs=1e-6)
    first, last5 = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert first == pytest.approx(math.log(toy_setup.vocab_size), abs=0.3)  # random init: ~uniform over the vocab
    assert last5 < 0.6 * first, (first, last5)

    # 56 train conversations / 8 = 7 steps an epoch: each epoch trains every assistant token exactly once
    chat = load_chat(toy_setup.model)
    examples, _ = sft_examples(read_records(toy_setup.sft), chat, 2048)
    train_set, eval_set = split_holdout(examples, 0.125, 0)
    assert len(train_set) == 7 * batch
    epoch_tokens = sum(sum(ex["mask"][1:]) for ex in train_set)
    assert sum(r["trained_tokens"] for r in rows[:7]) == epoch_tokens
    assert sum(r["trained_tokens"] for r in rows[7:14]) == epoch_tokens

    # eval_loss = mean NLL over every assistant token of the held-out rows, recomputed here with plain logits
    model = load_model(tmp_path / "out" / "final").eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for ex in eval_set:
            ids, mask = torch.tensor([ex["ids"]]), torch.tensor(ex["mask"][1:], dtype=torch.bool)
            token_nll = F.cross_entropy(model(ids)[0, :-1], ids[0, 1:], reduction="none")
            nll, count = nll + token_nll[mask].sum().item(), count + int(mask.sum())
    assert rows[-1]["eval_loss"] == pytest.approx(nll / count, abs=1e-4)
    assert rows[-1]["eval_loss"] < 0.6 * first


def test_resume_is_exact(toy_setup, tmp_path):
    """Packed rows (the default; ~2 toy conversations a row of 128 tokens) resume exactly too."""
    args = ("--max-steps", 6, "--lr", 1e-2, "--batch-size", 4, "--eval-frac", 0, "--save-every", 3, "--max-len", 128)
    full = train(toy_setup, toy_setup.sft, tmp_path / "full", *args)
    assert [p.name for p in (tmp_path / "full" / "ckpt-3").glob("train_state*")] == ["train_state.pt"]
    # an interrupted run: only ckpt-3 made it to disk; `--resume auto` must find it and go on from step 3
    shutil.copytree(tmp_path / "full" / "ckpt-3", tmp_path / "resumed" / "ckpt-3")
    resumed = train(toy_setup, toy_setup.sft, tmp_path / "resumed", *args, "--resume", "auto")
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for r, r_full in zip(resumed, full[3:]):
        for k in ("loss", "lr", "grad_norm", "trained_tokens"):
            assert r[k] == pytest.approx(r_full[k], abs=1e-6), (r["step"], k)
    assert max_weight_diff(read_weights(tmp_path / "resumed" / "final"), read_weights(tmp_path / "full" / "final")) < 1e-6
    # and the losses of steps 4-6 were not those of steps 1-3 again (the data order went on, the weights moved)
    assert [r["loss"] for r in resumed] != [r["loss"] for r in full[:3]]


def last_line(text):
    return [line for line in text.splitlines() if line.strip()][-1]


def test_malformed_jsonl_names_file_and_line(toy_setup, tmp_path):
    lines = toy_setup.sft.read_text().splitlines()[:5]
    lines[2] = lines[2][:-10]  # line 3 cut short
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(lines) + "\n")
    proc = run_script(SCRIPT, "--model", toy_setup.model, "--data", data, "--out", tmp_path / "out", *FP32,
                      check=False)
    assert proc.returncode != 0
    assert "sft.jsonl:3" in last_line(proc.stderr) and "malformed JSON" in last_line(proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "out" / "final").exists()


def test_no_assistant_turns_is_an_error(toy_setup, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": f"Hi {i}"}]} for i in range(4)])
    proc = run_script(SCRIPT, "--model", toy_setup.model, "--data", data, "--out", tmp_path / "out", *FP32,
                      check=False)
    assert proc.returncode != 0
    assert "no usable examples" in last_line(proc.stderr) and "sft.jsonl" in last_line(proc.stderr), proc.stderr[-2000:]


def test_help():
    proc = run_script(SCRIPT, "--help")
    assert "torchrun" in proc.stdout and "--grad-accum" in proc.stdout and "--resume" in proc.stdout


def test_lora_sft_trains_only_the_adapter_and_resumes(toy_setup, tmp_path):
    """--lora: the final dir is a PEFT adapter, the base weights are untouched, and resuming is exact here too."""
    args = ("--max-steps", 4, "--lr", 1e-2, "--batch-size", 4, "--eval-frac", 0, "--save-every", 2, *UNPACKED, "--lora",
            "--lora-r", 4, "--lora-alpha", 8, "--lora-dropout", 0)
    full = train(toy_setup, toy_setup.sft, tmp_path / "full", *args)
    final = tmp_path / "full" / "final"
    assert {p.name for p in final.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                    "README.md"}  # + the model card
    adapter = read_weights(final)
    assert all(k.startswith("base_model.model.model.layers.") for k in adapter)
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 0  # it trained
    assert full[-1]["loss"] < full[0]["loss"]
    shutil.copytree(tmp_path / "full" / "ckpt-2", tmp_path / "resumed" / "ckpt-2")
    resumed = train(toy_setup, toy_setup.sft, tmp_path / "resumed", *args, "--resume", "auto")
    for r, r_full in zip(resumed, full[2:]):
        assert r["loss"] == pytest.approx(r_full["loss"], abs=1e-6)
    assert max_weight_diff(read_weights(tmp_path / "resumed" / "final"), adapter) < 1e-6


def test_fp16_autocast_with_grad_scaler(toy_setup, tmp_path):
    """--precision fp16 (the seeds' 4090 runs) goes through the GradScaler path and still learns."""
    rows = train(toy_setup, toy_setup.sft, tmp_path / "fp16", "--device", "cpu", "--precision", "fp16",
                 "--max-steps", 8, "--lr", 1e-2, "--batch-size", 8, "--eval-frac", 0, "--save-every", 0, *UNPACKED)
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]


def test_default_precision_on_cpu_is_fp32(toy_setup, tmp_path):
    """No --precision on a CPU: fp32 (bf16 autocast is emulated there, many times slower), said in the log and
    recorded with the run's settings in the checkpoint."""
    out = tmp_path / "default"
    proc = run_script(SCRIPT, "--model", toy_setup.model, "--data", toy_setup.sft, "--out", out, "--device", "cpu",
                      "--max-steps", 1, "--batch-size", 1, "--eval-frac", 0, "--save-every", 1)
    assert "precision: fp32 (the default on cpu" in proc.stdout
    state = torch.load(out / "ckpt-1" / "train_state.pt", weights_only=False)
    assert state["args"]["precision"] == "fp32"


def test_bad_input_is_one_line_a_bug_keeps_its_traceback(toy_setup, tmp_path):
    """one_line_errors: an InputError (here a flag combination) is one line on stderr; a KeyError from inside our
    code (injected into data.sft_rows, as a bug would raise it) is not bad input and keeps its traceback."""
    import subprocess
    import sys
    args = ["--model", str(toy_setup.model), "--data", str(toy_setup.sft), "--out", str(tmp_path / "out"), *FP32]
    bad = run_script(SCRIPT, *args, "--batch-size", 1000, "--no-pack", check=False)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        "error: 63 conversations are fewer than one global batch (--batch-size x --grad-accum x world size)"], bad.stderr
    inject = ("import runpy, sys; import nanoalign.data as data\n"
              "def buggy(*a, **k): return {}['ids']\n"
              "data.sft_rows = buggy\n"
              f"sys.argv = [{SCRIPT!r}] + {args + ['--data-cache', '']!r}\n"  # tokenise now, not from the cache
              f"runpy.run_path({SCRIPT!r}, run_name='__main__')\n")
    bug = subprocess.run([sys.executable, "-c", inject], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bug.returncode != 0 and "Traceback" in bug.stderr and "KeyError: 'ids'" in bug.stderr, bug.stderr[-2000:]
    assert "in buggy" in bug.stderr  # the traceback reaches the line that raised


def test_diverging_run_stops_with_one_line_and_saves_no_nan(toy_setup, tmp_path):
    """--lr 1e30: the first update blows the weights up, every later loss is NaN. Each such step is skipped, the third
    in a row stops the run with one line; no final/, metrics.jsonl stays valid JSON. (It used to exit 0 with NaN
    weights in final/ and NaN tokens in metrics.jsonl.)"""
    out = tmp_path / "out"
    proc = run_script(SCRIPT, "--model", toy_setup.model, "--data", toy_setup.sft, "--out", out, *FP32, "--lr", 1e30,
                      "--max-steps", 20, "--batch-size", 1, "--eval-frac", 0, "--save-every", 1, check=False)
    rows = check_stopped_on_nan(proc, out)
    assert len(rows) == 4 and rows[0]["loss"] > 0  # step 1 was fine; 2, 3, 4 were not
def test_fsdp_two_ranks_match_one_process_and_resume(toy_setup, varied_sft, tmp_path):
    """--fsdp (FSDP2, gloo on CPU): 2 ranks train what 1 process trains (losses, grad norms, saved HF weights);
    the HF dir is gathered on rank 0; a run resumed from ckpt-2 ends where the uninterrupted one does."""
    common = ("--max-steps", 3, "--lr", 1e-3, "--eval-frac", 0, "--save-every", 2, "--max-len", 160)
    one = train(toy_setup, varied_sft, tmp_path / "one", "--batch-size", 12, *common)
    fsdp = train(toy_setup, varied_sft, tmp_path / "fsdp", "--batch-size", 6, "--fsdp", *common, nproc=2)
    for r, r_ref in zip(fsdp, one):
        assert r["loss"] == pytest.approx(r_ref["loss"], abs=1e-5)
        assert r["grad_norm"] == pytest.approx(r_ref["grad_norm"], rel=1e-4)
    weights = read_weights(tmp_path / "one" / "final")
    assert max_weight_diff(weights, read_weights(toy_setup.model)) > 1e-4
    assert max_weight_diff(read_weights(tmp_path / "fsdp" / "final"), weights) < 1e-5
    assert load_model(tmp_path / "fsdp" / "final") is not None  # a loadable HF dir, tied embedding and all
    shutil.copytree(tmp_path / "fsdp" / "ckpt-2", tmp_path / "resumed" / "ckpt-2")
    resumed = train(toy_setup, varied_sft, tmp_path / "resumed", "--batch-size", 6, "--fsdp", *common,
                    "--resume", "auto", nproc=2)
    assert [r["step"] for r in resumed] == [3]
    assert resumed[0]["loss"] == pytest.approx(fsdp[2]["loss"], abs=1e-6)
    assert max_weight_diff(read_weights(tmp_path / "resumed" / "final"), read_weights(tmp_path / "fsdp" / "final")) < 1e-6
