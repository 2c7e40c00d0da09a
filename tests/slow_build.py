"""train_sft.py whose token-cache build first sleeps $SLOW_BUILD_S seconds: in tests/test_scale.py, the stand-in for
a build of tens of minutes (smol-smoltalk) against a short process-group timeout ($NANOALIGN_DIST_TIMEOUT, standing
in for NCCL's 10 minutes). Only the builder sleeps; everything else is the real script. The process group gets
that timeout too where the script passes none (as it did before it read $NANOALIGN_DIST_TIMEOUT: a timeout then
meant torch's default), and the timeout it got is printed.

    SLOW_BUILD_S=4 NANOALIGN_DIST_TIMEOUT=3 torchrun --nproc_per_node=2 tests/slow_build.py <train_sft.py arguments>
"""
import os
import runpy
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from nanoalign import tokenized  # noqa: E402

build, init = tokenized.build_sft, dist.init_process_group


def slow_build(*args, **kwargs):
    time.sleep(float(os.environ["SLOW_BUILD_S"]))
    return build(*args, **kwargs)


def init_process_group(*args, **kwargs):
    given = "timeout" in kwargs
    kwargs.setdefault("timeout", timedelta(seconds=float(os.environ["NANOALIGN_DIST_TIMEOUT"])))
    print(f"process group timeout: {kwargs['timeout'].total_seconds()} s "
          f"({'the script' if given else 'torch default replaced'})", flush=True)
    return init(*args, **kwargs)


tokenized.build_sft = slow_build
dist.init_process_group = init_process_group
sys.argv[0] = str(ROOT / "train_sft.py")
runpy.run_path(sys.argv[0], run_name="__main__")
