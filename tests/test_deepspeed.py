"""DeepSpeed ZeRO-3: KaSA's truncation reads each weight inside deepspeed.zero.GatheredParameters (2 CPU processes)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_fsdp import _free_port

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (an sdist, kept out of the dev extra): pip install -e \".[dev,deepspeed]\"",
)


@pytest.mark.slow
def test_zero3_truncation_uses_the_gathered_weight():
    worker = Path(__file__).with_name("deepspeed_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(worker)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert completed.stdout.count("truncation of gathered ZeRO-3 weights ok") == 2
