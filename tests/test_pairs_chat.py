"""gen_pairs_chat.py against a stub chat-completions server on 127.0.0.1 (real sockets): JSON replies become pairs,
malformed ones are dropped and counted, a rerun asks only the prompts not answered yet, and the key comes from
the environment."""
import json
import threading

from nanoalign.data import preference_examples, read_records
from nanoalign.chat import load_chat
from tests.fixtures import cached_toy_setup, json_server, run_script, write_jsonl

REPLIES = {  # prompt -> the chat model's message content
    "q0": '{"chosen": "right 0", "rejected": "wrong 0"}',
    "q1": 'Sure!\n```json\n{"chosen": "right {1}", "rejected": "wrong \\"1\\""}\n```',  # fenced, with chatter
    "q2": "I cannot answer in JSON, sorry.",  # not JSON
    "q3": '{"chosen": "right 3"}',  # missing key
    "q4": '{"chosen": "same", "rejected": " same "}',  # chosen == rejected
    "q5": '{"chosen": "right 5", "rejected": "wrong 5"}',
    "q6": "too long",  # refused with HTTP 400
}


def test_pairs_from_chat_json(tmp_path, tmp_path_factory, monkeypatch):
    asked, auth, lock = [], set(), threading.Lock()

    def handle(path, headers, body):
        assert path == "/v1/chat/completions" and body["model"] == "gpt-test", (path, body)
        [message] = body["messages"]
        prompt = message["content"].rsplit("\n", 1)[-1]  # the default template ends with the prompt
        assert message["content"].startswith("Write two answers") and message["content"].endswith("\n" + prompt)
        with lock:
            asked.append(prompt)
            auth.add(headers.get("Authorization"))
        if prompt == "q6":
            return 400, {"error": "context length exceeded"}
        return 200, {"choices": [{"message": {"role": "assistant", "content": REPLIES[prompt]}, "finish_reason": "stop"}]}

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in REPLIES])
    out = tmp_path / "out"
    monkeypatch.setenv("TEST_PAIR_KEY", "sk-secret")
    with json_server(handle) as url:
        def run(max_prompts):
            return run_script("gen_pairs_chat.py", "--url", url, "--model", "gpt-test", "--prompts", prompts,
                              "--max-prompts", max_prompts, "--api-key-env", "TEST_PAIR_KEY", "--retries", 0,
                              "--out", out)
        run(6)
        assert sorted(asked) == ["q0", "q1", "q2", "q3", "q4", "q5"] and auth == {"Bearer sk-secret"}
        pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
        assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
            ([{"role": "user", "content": "q0"}], "right 0", "wrong 0"),
            ([{"role": "user", "content": "q1"}], "right {1}", 'wrong "1"'),
            ([{"role": "user", "content": "q5"}], "right 5", "wrong 5")]
        assert all(p["chosen_finished"] and p["rejected_finished"] and p["source"] == "chat:gpt-test" for p in pairs)
        summary = json.loads((out / "summary.json").read_text())
        assert summary == dict(prompts=6, asked=6, pairs=3, not_json=1, missing_key=1, same_text=1, refused=0)

        asked.clear()
        proc = run(7)  # one more prompt: only it is asked; the refused one is recorded, not asked again
        assert asked == ["q6"], asked
        assert "6 answered before, 1 to ask" in proc.stdout
        assert json.loads((out / "summary.json").read_text())["refused"] == 1
        asked.clear()
        run(7)
        assert asked == []
        assert len((out / "pairs.jsonl").read_text().splitlines()) == 3
    # train_dpo.py's reader takes the pairs as they are
    chat = load_chat(cached_toy_setup(tmp_path_factory).tokenizer)
    examples, stats = preference_examples(read_records(str(out / "pairs.jsonl")), chat, 512, 256)
    assert len(examples) == 3 and stats["kept"] == 3

    # a template with nowhere to put the prompt: one line naming the flag, nothing asked
    (tmp_path / "bad.txt").write_text("Answer in JSON.")
    proc = run_script("gen_pairs_chat.py", "--url", "http://127.0.0.1:9/v1", "--model", "gpt-test", "--prompts", prompts,
                      "--template", tmp_path / "bad.txt", "--out", tmp_path / "bad", check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: --template {tmp_path / 'bad.txt'}: no {{prompt}} in it to put the prompt in"], proc.stderr
