"""Shared helpers for the script-level tests: a tiny toy setup on disk, and running the scripts as a user would.

    from tests.fixtures import cached_toy_setup, run_script, read_metrics, read_weights

    @pytest.fixture(scope="session")
    def toy(tmp_path_factory):
        return cached_toy_setup(tmp_path_factory)          # built once per session, shared by every test file

    def test_x(toy, tmp_path):
        run_script("train_sft.py", "--model", toy.model, "--data", toy.sft, "--out", tmp_path / "out", nproc=2)
"""
import json
import os
import random
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from nanoalign.jsonl import write_jsonl  # noqa: F401  (the tests import it from here)

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ToySetup:
    root: Path
    tokenizer: Path  # tokenizer.json + tokenizer_config.json
    model: Path  # HF Qwen2 dir (config.json, model.safetensors, tokenizer files), random init
    sft: Path  # JSONL of toy.sft_demo rows
    prefs: Path  # JSONL of toy.preference_pair rows
    vocab_size: int  # embedding rows (the tokenizer has fewer tokens, as on Qwen2.5)


def make_toy_setup(root, n_sft=64, n_pairs=32, seed=0, vocab_size=512, **config_overrides) -> ToySetup:
    """Tokenizer, a random tiny Qwen2 model dir, SFT and preference JSONL under `root` (about 2 s on CPU).

    Args:
        n_sft, n_pairs: rows of sft.jsonl and prefs.jsonl (drawn with random.Random(seed)).
        vocab_size: embedding rows; must exceed the toy tokenizer's size (~412).
        config_overrides: any tiny_config field, e.g. num_hidden_layers=1.
    """
    from nanoalign import toy
    from nanoalign.chat import load_chat
    from nanoalign.model import CausalLM, ModelConfig, save_model

    root = Path(root)
    tok_dir = toy.build_tokenizer(root / "tokenizer")
    chat = load_chat(tok_dir)
    assert chat.vocab_size <= vocab_size, f"tokenizer has {chat.vocab_size} tokens, more than {vocab_size} rows"
    config = toy.tiny_config(vocab_size, bos_token_id=chat.endoftext_id, eos_token_id=chat.im_end_id,
                             **config_overrides)
    model = CausalLM(ModelConfig.from_hf(config)).init_weights(seed=seed)
    model_dir = save_model(model, root / "base", tokenizer_from=tok_dir)
    rng = random.Random(seed)
    sft = write_jsonl(root / "sft.jsonl", [toy.sft_demo(rng) for _ in range(n_sft)])
    prefs = write_jsonl(root / "prefs.jsonl", [toy.preference_pair(rng) for _ in range(n_pairs)])
    return ToySetup(root, tok_dir, model_dir, sft, prefs, vocab_size)


_CACHE: dict = {}


def cached_toy_setup(tmp_path_factory, **kwargs) -> ToySetup:
    """make_toy_setup, built once per pytest session for each distinct kwargs (treat the files as read-only)."""
    key = tuple(sorted(kwargs.items()))
    if key not in _CACHE:
        _CACHE[key] = make_toy_setup(tmp_path_factory.mktemp("toy"), **kwargs)
    return _CACHE[key]


def run_script(script, *args, nproc=1, timeout=300, check=True, threads=1):
    """Run a repo script as a user would: `python script ...`, or torchrun with nproc processes (gloo on CPU).

    Args:
        args: command-line arguments (Paths and numbers are turned into strings).
        nproc: > 1 runs `python -m torch.distributed.run --standalone --nproc_per_node=nproc` (a free port).
        check: raise with the stderr tail when the exit status is not 0.
        threads: OMP_NUM_THREADS of each process. 1 by default: tiny models gain nothing from more, and on a
            busy 2-core machine a second spinning OpenMP thread makes a step 10x slower.
    Returns:
        subprocess.CompletedProcess with text stdout and stderr.
    """
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    else:
        cmd = [sys.executable, script]
    cmd += [str(a) for a in args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {proc.returncode}\n--- stderr tail ---\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(out_dir) -> list[dict]:
    """The rows of <out_dir>/metrics.jsonl."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line]


def read_weights(model_dir) -> dict:
    """Every tensor of an HF model dir (or adapter dir with model.safetensors / adapter_model.safetensors)."""
    from safetensors.torch import load_file
    model_dir = Path(model_dir)
    files = [p for p in (model_dir / "model.safetensors", model_dir / "adapter_model.safetensors") if p.exists()]
    assert files, f"no safetensors file in {model_dir}"
    return load_file(str(files[0]))


def max_weight_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two state dicts with the same keys and shapes."""
    assert a.keys() == b.keys(), f"different keys: {sorted(a.keys() ^ b.keys())[:5]}"
    for k in a:
        assert a[k].shape == b[k].shape, f"{k}: {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@contextmanager
def json_server(handle):
    """A real HTTP server on 127.0.0.1 (a free port) in a thread, for endpoint stubs.

    handle(path, headers, body) -> (status, payload) answers each POST, whose body is JSON; payload is JSON-able,
    or bytes sent as they are. Yields the base URL, http://127.0.0.1:<port>/v1.
    """
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, payload = handle(self.path, self.headers, body)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as url:
        yield url


@contextmanager
def serving(server):
    """Run a socketserver server (bound to 127.0.0.1) in a thread; yields http://127.0.0.1:<port>/v1."""
    server.handle_error = lambda *a: None  # a client that timed out closes its socket: not a test failure
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.01), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
