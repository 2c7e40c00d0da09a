"""bench/bench_memory.py --tiny runs on CPU: every phase of a LoRA DPO step measured in a fresh process, and what
autograd saves for backward (a smoke test of the code path, not a performance figure)."""
import json
import math

import pytest

from tests.fixtures import ROOT, run_script

PHASES = ["imports", "load", "setup", "policy forward", "reference forward", "backward", "optimizer step"]


def bench(tmp_path, cases):
    proc = run_script(str(ROOT / "bench" / "bench_memory.py"), "--tiny", "--cases", cases, "--work", tmp_path)
    results = {r["case"]: r for r in (json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
                                      if line.startswith("RESULT "))}
    assert results and not [r for r in results.values() if "error" in r], proc.stdout[-2000:] + proc.stderr[-2000:]
    return results


def test_phases_and_saved_for_backward(tmp_path):
    results = bench(tmp_path, "ours,ours+ckpt")
    plain, ckpt = results["ours_dpo_lora_memory"], results["ours_dpo_lora_memory_ckpt"]
    for r in (plain, ckpt):
        assert list(r["phases"]) == PHASES and r["measure"] == "cpu_rss" and r["tiny"] is True
        assert all(0 < p["after_gib"] <= p["peak_gib"] for p in r["phases"].values()), r["phases"]
        assert r["peak_gib"] == pytest.approx(max(p["peak_gib"] for p in r["phases"].values()), abs=1e-6)
        assert r["loss"] == pytest.approx(math.log(2), abs=0.01)  # the second step, after a 5e-6 update
        saved = r["saved_activation_gib"] + r["saved_parameter_gib"]
        assert r["saved_gib"] == pytest.approx(saved, abs=3e-6)  # each rounded to 6 places
    # checkpointing keeps each block's input instead of its activations
    assert ckpt["saved_activation_gib"] < plain["saved_activation_gib"] / 4, (ckpt, plain)


def test_same_saved_activations_as_trl_peft(tmp_path):
    """The peer, on the same weights and tokens, saves the same activations for backward (within 5%: its own
    bookkeeping tensors); where the process peaks differ, it is not in what the step holds."""
    pytest.importorskip("trl")
    results = bench(tmp_path, "ours,peer,ours+ckpt,peer+ckpt")
    for suffix in ("", "_ckpt"):
        ours, peer = results[f"ours_dpo_lora_memory{suffix}"], results[f"trl_peft_dpo_lora_memory{suffix}"]
        assert ours["saved_activation_gib"] == pytest.approx(peer["saved_activation_gib"], rel=0.05), (ours, peer)
        assert list(peer["phases"]) == PHASES
