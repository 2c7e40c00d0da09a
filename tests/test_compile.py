"""Scale tier: the torch.compile paths, on CPU (inductor). The engine's decode step compiled with compile=True
samples the eager tokens in one graph (fullgraph: a break would raise), and `--compile` trains what eager trains, for SFT and DPO.

Inductor compiles C++ kernels here, so these tests cost tens of seconds: one tiny model, few steps, one run each."""
import random

import pytest
import torch

from tests.fixtures import cached_toy_setup, read_metrics, run_script

pytestmark = pytest.mark.scale


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return cached_toy_setup(tmp_path_factory)


def test_compiled_decode_step_samples_the_eager_tokens_in_one_graph(toy):
    """Engine(compile=True) on CPU runs the decode step through inductor with fullgraph=True (a graph break would
    raise); every prompt's tokens equal eager's, and the step compiles into one graph, reused at every step."""
    from torch._dynamo.utils import counters

    from nanoalign.chat import load_chat
    from nanoalign.engine import Engine
    from nanoalign.model import load_model
    from nanoalign.toy import make_prompt

    chat = load_chat(toy.model)
    model = load_model(toy.model)
    rng = random.Random(0)
    prompts = [chat.render_prompt(make_prompt(rng)[0]) for _ in range(20)]
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        engine = Engine(model, slots=8, max_len=128, stop_ids=chat.stop_ids, temperature=1.0, top_p=0.9,
                        vocab_limit=chat.vocab_size, compile=compiled, min_span=16, pad_id=chat.pad_id)
        assert (engine.step != engine._decode) == compiled  # a bound method compares equal to itself
        results.append(dict(engine.stream(((p, 24, (i, 0)) for i, p in enumerate(prompts)), seed=3)))
        graphs = counters["stats"]["unique_graphs"]
    assert len(results[1]) == 20 and results[1] == results[0]
    assert any(len(t) > 1 for t in results[0].values())
    assert graphs == 1, dict(counters["stats"])  # every row here fits one attention span: one graph, no break


@pytest.mark.parametrize("script", ["train_sft.py", "train_dpo.py"])
def test_compile_flag_gives_the_eager_losses(toy, tmp_path, script):
    data = ["--data", toy.sft] if script == "train_sft.py" else ["--data", toy.prefs]
    common = ["--model", toy.model, *data, "--max-steps", 3, "--batch-size", 4, "--save-every", 0,
              "--eval-every", 0, "--eval-frac", 0, "--precision", "fp32", "--device", "cpu", "--max-len", 96]
    run_script(script, *common, "--out", tmp_path / "eager")
    run_script(script, *common, "--compile", "--out", tmp_path / "compiled", timeout=600)
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert [r["step"] for r in compiled] == [1, 2, 3]
    for e, c in zip(eager, compiled):
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-4, abs=1e-5), (e, c)
        assert c["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-3, abs=1e-5), (e, c)
