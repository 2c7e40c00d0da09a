"""What a killed or hurt run leaves in its JSONL files, read back by the next one (nanoalign/jsonl.py and the caches
of nanoalign/endpoint.py), each fault made for real: a part file repaired while another rank reads it (threads racing
on a real file), rows torn inside a UTF-8 character, rows of valid JSON but the wrong schema, a cache whose torn tail
would swallow the next row, and a full disk (a real tmpfs) under gen_pairs_chat.py."""
import hashlib
import json
import subprocess
import threading


from nanoalign.completions import HttpPolicy
from nanoalign.endpoint import HttpReward, JsonlCache
from nanoalign.jsonl import ShardedJsonl, has_fields, jsonl_lines
from tests.fixtures import json_server, run_script, tmpfs, write_jsonl

SAMPLE = dict(prompt_id=str, sample=int, response=str, score=(int, float, type(None)))


def sample_key(row):
    return row["prompt_id"], row["sample"]


def test_every_rank_reads_the_same_rows_while_an_owner_repairs_its_part(tmp_path):
    """Rank 1 cuts the torn tail off its part file while rank 0 reads every part (the start-up of a torchrun job).
    Rank 0 must see the same whole rows at every moment: the old repair rewrote the whole file, and a rank reading
    inside that window saw it empty or half written, so its `todo` and its share `todo[rank::world]` differed from
    the other ranks' (prompts skipped or done twice)."""
    path = tmp_path / "samples.jsonl"
    part = tmp_path / "samples.part1-of-2.jsonl"
    rows = [dict(prompt_id=f"p{i}", sample=0, response="x" * 4000, score=0.5) for i in range(300)]
    whole = jsonl_lines(rows).encode()
    part.write_bytes(whole)
    seen, stop = [], threading.Event()

    def rank0():
        while not stop.is_set():
            try:
                seen.append(len(ShardedJsonl(path, sample_key, rank=0, world=2, check=has_fields(SAMPLE)).rows))
            except Exception as e:  # noqa: BLE001  (the old reader could fail outright too)
                seen.append(repr(e))

    reader = threading.Thread(target=rank0)
    reader.start()
    repairs = 0
    while repairs < 40 or len(seen) < 40:
        with open(part, "ab") as f:  # a kill in the middle of a row
            f.write(b'{"prompt_id": "p300", "sample": 0, "resp')
        ShardedJsonl(path, sample_key, rank=1, world=2, check=has_fields(SAMPLE))  # the owner repairs its part
        assert part.read_bytes() == whole
        repairs += 1
    stop.set()
    reader.join()
    assert set(seen) == {300}, sorted(set(map(str, seen)))


def test_torn_utf8_and_wrong_schema_rows_are_dropped_named_and_redone(tmp_path, capsys):
    """A part torn inside a two-byte character (it stopped the rerun with UnicodeDecodeError) loses only the torn
    row; rows of valid JSON but not a sample (no prompt_id: a KeyError before; a string sample number; not an
    object) are dropped with one line naming the file, the first line and the count, and are not counted as done."""
    path = tmp_path / "samples.jsonl"
    good = [dict(prompt_id="a", sample=k, response="café", score=1.0) for k in range(2)]
    write_jsonl(path, good + [dict(prompt_id="b", sample=0, response="ok", score=None)])
    with open(path, "ab") as f:
        f.write(b'{"sample": 1, "response": "x", "score": 0}\n'  # line 4: no prompt_id
                b'{"prompt_id": "b", "sample": "1", "response": "x", "score": 0}\n'  # line 5: sample is a string
                b'[1, 2]\n')  # line 6
    part = tmp_path / "samples.part0-of-1.jsonl"
    part.write_bytes(jsonl_lines([dict(prompt_id="c", sample=0, response="é", score=2)]).encode()
                     + '{"prompt_id": "c", "sample": 1, "response": "é'.encode()[:-1])  # cut inside "é"
    rows = ShardedJsonl(path, sample_key, check=has_fields(SAMPLE)).rows
    assert sorted(map(sample_key, rows)) == [("a", 0), ("a", 1), ("b", 0), ("c", 0)]
    assert capsys.readouterr().out == (f"{path}:4: no field 'prompt_id': dropped 3 damaged rows (lines 4, 5, 6); "
                                       f"their work is redone\n")
    assert part.read_bytes().endswith(b'"score": 2}\n')  # the owner cut the torn row off its part, in place


def reward_reply(path, headers, body):
    return 200, {"choices": [{"message": {"role": "assistant",
                                          "content": f"reward:{len(body['messages'][-1]['content'])}"}}]}


def test_reward_and_policy_caches_drop_damaged_rows_and_ask_again(tmp_path, capsys):
    """reward_cache.jsonl rows of valid JSON but not a score (no score: it used to come back as a silent `skipped`;
    a string score; no id; an array), another model's row and a row torn inside a UTF-8 character: the damaged
    items are asked again, the file keeps only whole rows, and a row appended after a torn tail is not swallowed
    by it. policy_cache.jsonl with a row lacking `text` stopped HttpPolicy with a KeyError."""
    model = "nvidia/llama-3.1-nemotron-70b-reward"
    cache = tmp_path / "reward_cache.jsonl"
    sha = lambda text: hashlib.sha256(text.encode()).hexdigest()  # noqa: E731
    rows = [dict(model=model, id="p0", response_sha256=sha("r0"), score=0.5),
            dict(model=model, id="p1", response_sha256=sha("r1")),
            dict(model=model, id="p2", response_sha256=sha("r22"), score="high"),
            dict(model=model, response_sha256=sha("r333"), score=1.0),
            [1, 2],
            dict(model="another", id="p1", response_sha256=sha("r1"), score=9.0)]
    cache.write_bytes(jsonl_lines(rows).encode() + f'{{"model": "{model}", "id": "p3", "error": "caf'.encode()
                      + "é".encode()[:1])
    asked = []

    def handle(path, headers, body):
        asked.append(body["messages"][-1]["content"])
        return reward_reply(path, headers, body)

    prompt = [{"role": "user", "content": "q"}]
    with json_server(handle) as url:
        reward = HttpReward(url, model=model, cache_path=cache, retries=0, timeout=5)
        assert capsys.readouterr().out == (f"{cache}:2: no field 'score': dropped 4 damaged rows (lines 2, 3, 4, 5); "
                                           f"their items are asked again\n")
        scores = reward.score([prompt] * 4, ["r0", "r1", "r22", "r4444"], ids=["p0", "p1", "p2", "p3"])
    assert scores == [0.5, 2.0, 3.0, 5.0] and sorted(asked) == ["r1", "r22", "r4444"]
    kept = [json.loads(line) for line in cache.read_text().splitlines()]
    assert kept[:2] == [rows[0], rows[5]] and sorted(r["score"] for r in kept[2:]) == [2.0, 3.0, 5.0]  # any order

    # a kill mid-append, then a new row: the torn bytes are cut first, so the new row is whole on disk
    with open(cache, "ab") as f:
        f.write(b'{"model": "nvid')
    JsonlCache(cache, ("id", "response_sha256"), {"model": model}).put(("p5", sha("r5")), score=7.0)
    assert JsonlCache(cache, ("id", "response_sha256"), {"model": model}).get(("p5", sha("r5")))["score"] == 7.0

    policy_cache = tmp_path / "policy_cache.jsonl"
    policy_cache.write_text(json.dumps({"request_sha256": "0" * 64, "model": "m", "n_tokens": 3}) + "\n")
    policy = HttpPolicy("http://127.0.0.1:9/v1", "m", [1], 4, cache_path=policy_cache)
    assert policy.cache.get(("0" * 64,)) is None
    assert capsys.readouterr().out == (f"{policy_cache}:1: no field 'text': dropped 1 damaged row (line 1); their "
                                       f"items are asked again\n")


def test_full_disk_under_gen_pairs_chat_is_one_line_and_keeps_the_replies(tmp_path):
    """A tmpfs that fills after a few replies: one line naming the dir (it was an Errno 28 traceback), and every
    reply written before is whole in chat_cache.jsonl, where a rerun with room finds it and asks only the rest."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}"} for i in range(40)])
    asked = []

    def handle(path, headers, body):
        prompt = body["messages"][0]["content"].rsplit("\n", 1)[-1]
        asked.append(prompt)
        content = json.dumps({"chosen": f"right {prompt} " + "a" * 3000, "rejected": f"wrong {prompt}"})
        return 200, {"choices": [{"message": {"role": "assistant", "content": content}}]}

    with tmpfs(tmp_path / "disk", "64k") as disk, json_server(handle) as url:
        out = disk / "run"
        args = ("gen_pairs_chat.py", "--url", url, "--model", "gpt-test", "--prompts", prompts, "--retries", 0,
                "--concurrency", 1, "--out", out)
        proc = run_script(*args, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1] == (f"error: no space left on {out} (writing chat_cache.jsonl); "
                                                        f"what was written before is kept")
        kept = JsonlCache(out / "chat_cache.jsonl", ("prompt_id",), {"model": "gpt-test"}, {"content": str}).rows
        assert 5 <= len(kept) < len(asked) < 40  # the reply that did not fit (and one in flight) are not kept
        subprocess.run(["mount", "-o", "remount,size=1m", str(disk)], check=True)  # room again: rerun
        asked.clear()
        proc = run_script(*args)
        assert f"{len(kept)} answered before, {40 - len(kept)} to ask" in proc.stdout
        assert len(asked) == 40 - len(kept) and len((out / "pairs.jsonl").read_text().splitlines()) == 40
