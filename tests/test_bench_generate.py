"""bench/bench_generate.py --tiny runs on CPU: the synthetic workload through our engine and through HF generate with
the same forced per-row stops (a smoke test of the code path, not a performance figure)."""
import json

from tests.fixtures import ROOT, run_script


def test_workload_case_runs_with_the_same_forced_lengths():
    proc = run_script(str(ROOT / "bench" / "bench_generate.py"), "--tiny", "--peer", "--cases", "workload",
                      "--hf-cases", "workload+static", "--repeats", 1)
    results = {r["case"]: r for r in (json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
                                      if line.startswith("RESULT "))}
    assert not [r for r in results.values() if "error" in r], proc.stdout[-2000:]
    ours, hf = results["ours_generate_workload"], results["hf_inproc_generate_static_workload"]
    assert (ours["rows"], ours["prompts"], ours["slots"]) == (48, 12, 8)
    # HF ran the first 4 prompts x 4 samples; its new-token count is the drawn lengths it was forced to (asserted
    # inside the bench against the same draws ours made exactly)
    assert (hf["rows"], hf["prompts"]) == (16, 4) and 2 * 16 <= hf["new_tokens"] <= 12 * 16
    assert 2 * 48 <= ours["new_tokens"] <= 12 * 48 and hf["ours_case"] == "ours_generate_workload"
    assert ours["tiny"] is True
