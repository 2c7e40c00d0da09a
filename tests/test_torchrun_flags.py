"""Every flag of the four scripts survives torchrun: its own argument parser must hand each one to the script
untouched, not read it as an (abbreviated) option of its own (`--n` once died there: "ambiguous option: --n could
match --nnodes, --nproc-per-node, ...")."""
import contextlib
import io
import os
import re
import subprocess
import sys

import pytest
from torch.distributed.run import get_args_parser

from tests.fixtures import ROOT

SCRIPTS = ["train_sft.py", "train_dpo.py", "gen_synthetic.py", "eval_winrate.py"]


@pytest.fixture(scope="module")
def flags():
    """{script: its flags, read from its --help}: the four run side by side."""
    procs = {s: subprocess.Popen([sys.executable, s, "--help"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"}) for s in SCRIPTS}
    found = {}
    for script, proc in procs.items():
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, f"{script} --help failed"
        found[script] = sorted(set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", out)) - {"--help"})
    return found


def through_torchrun(script, args):
    """The script's arguments as torchrun's parser passes them on, or its error line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parsed = get_args_parser().parse_args(["--standalone", "--nproc-per-node=2", script, *args])
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1]
    return parsed.training_script_args


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_passes_through_torchrun(flags, script):
    assert len(flags[script]) > 20 and "--out" in flags[script]  # the --help was read
    for flag in flags[script]:
        assert through_torchrun(script, [flag, "1"]) == [flag, "1"], flag
        assert through_torchrun(script, [f"{flag}=1"]) == [f"{flag}=1"], flag


def test_the_check_catches_an_ambiguous_flag():
    assert "ambiguous option: --n could match" in through_torchrun("gen_synthetic.py", ["--n", "4"])
