"""Numbers that are not numbers never pass for results: weights holding a NaN or inf are refused where a model is
loaded (policy, reference, adapters, merged; reward models in test_reward.py), a reward score that is NaN, inf or
beyond ±1e6 is asked again and then stops the run, a cached score gets the checks a fresh one gets, and
config.json's and adapter_config.json's fields are checked by type. Also which names are sent to the hub: none that
looks like a path."""
import hashlib
import json
import random
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoalign import toy
from nanoalign.chat import load_chat
from nanoalign.completions import HttpPolicy
from nanoalign.endpoint import NEMOTRON_REWARD, sha256
from nanoalign.errors import InputError
from nanoalign.lora import add_lora, load_adapter, load_merged, save_adapter
from nanoalign.model import load_config, load_model
from nanoalign.reward import HttpReward, RewardServerError
from tests.fixtures import cached_toy_setup, json_server, run_script, write_jsonl


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    return cached_toy_setup(tmp_path_factory).model


def with_tensor(src, dst, name, index, value):
    """A copy of model dir `src` at `dst` with tensor[index] = value."""
    dst = shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors[name][index] = value
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def refused(source, name, dtype):
    return rf"^{re.escape(str(source))}: tensor '{re.escape(name)}' holds NaN or inf \(as {dtype}\): a diverged"


UP = "model.layers.1.mlp.up_proj.weight"


def test_weights_with_nan_or_inf_are_refused_where_a_model_is_loaded(toy_model, tmp_path):
    nan = with_tensor(toy_model, tmp_path / "nan", UP, (3, 5), float("nan"))
    with pytest.raises(InputError, match=refused(nan, UP, "float32")):
        load_model(nan)  # train_sft.py, train_dpo.py (policy and --ref)
    with pytest.raises(InputError, match=refused(nan, UP, "bfloat16")):
        load_merged(nan, dtype=torch.bfloat16)  # gen_synthetic.py, eval_winrate.py
    inf = with_tensor(toy_model, tmp_path / "inf", "model.embed_tokens.weight", (7, 0), -float("inf"))
    with pytest.raises(InputError, match=refused(inf, "model.embed_tokens.weight", "float32")):
        load_model(inf)
    # finite as stored, inf once cast: checked where the weights end up, in the dtype they are used in
    big = with_tensor(toy_model, tmp_path / "big", UP, (0, 0), 1e5)
    load_model(big)
    with pytest.raises(InputError, match=refused(big, UP, "float16")):
        load_model(big, dtype=torch.float16)

    # an adapter with a NaN, loaded to train on (train_dpo.py) or merged; a NaN base under a sound adapter
    model = load_model(toy_model)
    add_lora(model, "a", r=2)
    good = save_adapter(model, "a", tmp_path / "good")
    bad = shutil.copytree(good, tmp_path / "bad")
    tensors = load_file(bad / "adapter_model.safetensors")
    lora_b = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    tensors[lora_b][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(InputError, match=refused(bad / "adapter_model.safetensors", lora_b, "float32")):
        load_adapter(load_model(toy_model), bad)
    with pytest.raises(InputError, match=refused(bad / "adapter_model.safetensors", lora_b, "float32")):
        load_merged(toy_model, [good, bad])
    with pytest.raises(InputError, match=refused(f"{nan} with {good} merged", UP, "bfloat16")):
        load_merged(nan, [good], dtype=torch.bfloat16)
    load_merged(toy_model, [good], dtype=torch.bfloat16)


def test_gen_synthetic_refuses_a_policy_with_nan_weights(toy_model, tmp_path):
    """It used to sample 36 answers like '!!!!!!' from such a model, judge them and exit 0."""
    nan = with_tensor(toy_model, tmp_path / "nan", UP, (0, 1), float("nan"))
    rng = random.Random(0)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": toy.make_prompt(rng)[0][0]["content"]}
                                                       for _ in range(4)])
    out = tmp_path / "out"
    proc = run_script("gen_synthetic.py", "--model", nan, "--prompts", prompts, "--reward", "toy", "--out", out,
                      "--num-samples", 2, "--max-new-tokens", 2, "--device", "cpu", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.match(refused(f"error: {nan}", UP, "float32"), proc.stderr.strip().splitlines()[-1])
    assert not [line for f in out.glob("samples*.jsonl") for line in f.read_text().splitlines()]


def reward_reply(score):
    return {"choices": [{"message": {"role": "assistant", "content": ""},
                         "logprobs": {"content": [{"token": "reward", "logprob": score}]}}]}


PROMPT = [{"role": "user", "content": "2+2?"}]


def test_reward_scores_beyond_the_bound_are_asked_again_then_stop_the_run():
    """±1e308 is finite, but its differences and means overflow: never a score. 1e6 itself is one."""
    replies = iter([1e308, -1e7, 1e6, -1e6])
    with json_server(lambda path, headers, body: (200, reward_reply(next(replies)))) as url:
        assert HttpReward(url, retries=2, backoff=0.01).score([PROMPT], ["4"]) == [1e6]
        assert HttpReward(url, retries=0).score([PROMPT], ["5"]) == [-1e6]
    with json_server(lambda path, headers, body: (200, reward_reply(-1e308))) as url:
        with pytest.raises(RewardServerError, match=r"unusable score -1e\+308 in the reply \(NaN, inf or beyond "
                                                    r"±1e\+06\) after 2 attempts$"):
            HttpReward(url, retries=1, backoff=0.01).score([PROMPT], ["4"])


def test_a_cached_score_gets_the_checks_a_fresh_one_gets(tmp_path):
    """A NaN (left by a run killed between scoring and appending, as the campaign found it), 1e308, a string or no
    score in reward_cache.jsonl: dropped and asked again, never returned (it used to land in samples.jsonl as a
    bare NaN). A sound score and a recorded refusal are used as they are."""
    cache = tmp_path / "reward_cache.jsonl"
    lines = {"a": '"score": NaN', "b": '"score": 1e308', "c": '"score": "3.0"', "d": '"score": 2.0',
             "e": '"error": "HTTP 400: too long"', "f": '"score": null'}
    cache.write_text("".join(f'{{"model": "{NEMOTRON_REWARD}", "id": "p", "response_sha256": "{sha256(r)}", {v}}}\n'
                             for r, v in lines.items()))
    asked = []

    def handle(path, headers, body):
        asked.append(body["messages"][-1]["content"])
        return 200, reward_reply(float(len(asked)))

    with json_server(handle) as url:
        rm = HttpReward(url, cache_path=cache)
        scores = rm.score([PROMPT] * 6, list("abcdef"), ids=["p"] * 6)
        assert sorted(asked) == ["a", "b", "c", "f"] and rm.cache_hits == 2
        assert scores == [float(asked.index(r) + 1) if r in asked else {"d": 2.0, "e": None}[r] for r in "abcdef"]

        def strict(token):
            raise AssertionError(f"{token} in what was appended")
        # on open the cache cut the rows that hold no score (NaN, 1e308, "3.0", null): the 4 new rows are the last ones
        new = [json.loads(line, parse_constant=strict) for line in cache.read_text().splitlines()[-4:]]
        assert sorted(row["response_sha256"] for row in new) == sorted(sha256(r) for r in "abcf")
        again = HttpReward(url, cache_path=cache)
        assert again.score([PROMPT] * 6, list("abcdef"), ids=["p"] * 6) == scores and len(asked) == 4



def test_a_cached_policy_answer_gets_the_checks_a_fresh_one_gets(tmp_path):
    """policy_cache.jsonl rows with a NaN token count, a number for a text, no `finished`: asked again, never
    returned (a KeyError or a NaN in samples.jsonl before). A sound row is used as it is."""
    asked = []

    def handle(path, headers, body):
        asked.append(body["prompt"])
        return 200, {"choices": [{"text": "fresh", "finish_reason": "stop"}], "usage": {"completion_tokens": 2}}

    with json_server(handle) as url:
        policy = HttpPolicy(url, "m", stop_ids=[0], max_new_tokens=4)
        shas = [hashlib.sha256(json.dumps(policy.payload([i], ("p", 0)), sort_keys=True).encode()).hexdigest()
                for i in range(4)]
        cache = tmp_path / "policy_cache.jsonl"
        cache.write_text(f'{{"request_sha256": "{shas[0]}", "text": "kept", "n_tokens": 3, "finished": true}}\n'
                         f'{{"request_sha256": "{shas[1]}", "text": "x", "n_tokens": NaN, "finished": true}}\n'
                         f'{{"request_sha256": "{shas[2]}", "text": 5, "n_tokens": 1, "finished": true}}\n'
                         f'{{"request_sha256": "{shas[3]}", "text": "x", "n_tokens": 1}}\n')
        policy = HttpPolicy(url, "m", stop_ids=[0], max_new_tokens=4, cache_path=cache)
        answers = policy.sample([([i], ("p", 0)) for i in range(4)])
    assert answers == [("kept", 3, True)] + [("fresh", 2, True)] * 3 and sorted(asked) == [[1], [2], [3]]

@pytest.mark.parametrize("field, value, want", [
    ("num_hidden_layers", "two", "an integer >= 1"),
    ("num_attention_heads", 4.0, "an integer >= 1"),
    ("hidden_size", 0, "an integer >= 1"),
    ("vocab_size", True, "an integer >= 1"),
    ("rms_norm_eps", float("nan"), "a finite number > 0"),
    ("rope_theta", -1, "a finite number > 0"),
    ("tie_word_embeddings", "false", "true or false"),
])
def test_config_numbers_are_checked_by_type(toy_model, tmp_path, field, value, want):
    """One line naming config.json and the field (a string "two" was a TypeError deep in the model)."""
    model_dir = shutil.copytree(toy_model, tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(InputError) as error:
        load_config(model_dir)
    assert str(error.value) == f"{model_dir / 'config.json'}: field '{field}' must be {want}, got {value!r}"


@pytest.fixture(scope="module")
def adapter(toy_model, tmp_path_factory):
    model = load_model(toy_model)
    add_lora(model, "a", r=8, alpha=16)
    return save_adapter(model, "a", tmp_path_factory.mktemp("adapter") / "a")


@pytest.mark.parametrize("field, value, want", [
    ("r", "eight", "an integer >= 1"),  # was blamed on adapter_model.safetensors: "model and r=eight expect ..."
    ("r", 8.0, "an integer >= 1"),
    ("lora_alpha", "16", "a finite number > 0"),
    ("lora_alpha", float("nan"), "a finite number > 0"),
    ("lora_dropout", 1.5, "a number in [0, 1)"),
    ("target_modules", 7, "a non-empty list of module names or a regular expression"),  # was a TypeError
    ("target_modules", [], "a non-empty list of module names or a regular expression"),
    ("target_modules", "q_proj(", "a non-empty list of module names or a regular expression"),  # was re.error
])
def test_adapter_config_fields_are_checked_by_type(toy_model, adapter, tmp_path, field, value, want):
    """adapter_config.json's fields as config.json's: one line naming the file and the field, before any tensor."""
    bad = shutil.copytree(adapter, tmp_path / "bad")
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(InputError) as error:
        load_adapter(load_model(toy_model), bad)
    assert str(error.value) == f"{bad / 'adapter_config.json'}: field '{field}' must be {want}, got {value!r}"


def test_a_name_that_looks_like_a_path_is_never_sent_to_the_hub(tmp_path, monkeypatch):
    """`runs/nothing-here` while runs/ is a local dir is a mistyped path, not a hub id: "not found", not the hub's
    offline message. An `owner/name` that is no local path goes to the hub, and its failure says both."""
    import huggingface_hub
    asked = []

    def offline(repo_id, *args, **kwargs):
        asked.append(repo_id)
        raise OSError("offline mode is enabled\n  and it is not in the cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        load_model("runs/nothing-here")
    assert str(error.value) == "model dir not found: runs/nothing-here (runs/ is a local dir, so this is a path, not a hub id)"
    with pytest.raises(FileNotFoundError, match="^runs/nothing-here: no such directory or file"):
        load_chat("runs/nothing-here")
    for name in ("./x/y", "/x/y", "~/x", "a/b/c", "x", "x/"):
        with pytest.raises(FileNotFoundError, match=f"^model dir not found: {re.escape(name)}$"):
            load_model(name)
    assert asked == []
    with pytest.raises(FileNotFoundError) as error:
        load_model("someone/some-model")
    assert str(error.value) == ("model dir not found: someone/some-model is no local dir, and as a hub id: OSError: "
                                "offline mode is enabled and it is not in the cache")
    assert asked == ["someone/some-model"]


def test_a_completion_reply_with_a_count_that_is_no_count_is_no_completion():
    """parse_completion took a negative, fractional or quoted usage.completion_tokens and a null text ("None") as a
    fresh answer (the policy cache already refused them when read back)."""
    from nanoalign.completions import parse_completion

    def reply(text="hi", n=2, reason="stop"):
        return json.dumps({"choices": [{"text": text, "finish_reason": reason}],
                           "usage": {"completion_tokens": n}}).encode()
    assert parse_completion(reply()) == ("hi", 2, True)
    assert parse_completion(reply(n=0, reason="length")) == ("hi", 0, False)
    for bad in (reply(n=-3), reply(n=2.5), reply(n="7"), reply(n=True), reply(n=None), reply(text=None),
                reply(reason=None), b"[]", b"{}"):
        with pytest.raises(ValueError, match="^no completion in the reply"):
            parse_completion(bad)
