import threading, time
from nanoalign.jsonl import ShardedJsonl, jsonl_lines

def key(r): return r["prompt_id"]

def test_race(tmp_path):
    path = tmp_path / "samples.jsonl"
    part = tmp_path / "samples.part1-of-2.jsonl"
    rows = [{"prompt_id": f"p{i}", "sample": 0, "response": "x" * 4000} for i in range(300)]
    whole = jsonl_lines(rows).encode()
    part.write_bytes(whole)
    seen, stop = [], threading.Event()
    def reader():
        while not stop.is_set():
            try:
                seen.append(len(ShardedJsonl(path, key, rank=0, world=2).rows))
            except Exception as e:
                seen.append(repr(e))
    t = threading.Thread(target=reader); t.start()
    t0 = time.time()
    for _ in range(40):
        with open(part, "ab") as f:
            f.write(b'{"prompt_id": "p300", "resp')
        ShardedJsonl(path, key, rank=1, world=2)
        assert part.read_bytes() == whole
    stop.set(); t.join()
    print(time.time() - t0, len(seen))
    assert set(seen) == {300}, sorted(set(map(str, seen)))
