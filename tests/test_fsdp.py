"""FSDP2 on the CPU (gloo, 2 processes): the adapters shard, train, and the saved adapter equals the one-process run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("fsdp_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def test_fsdp2_fully_shard_trains_the_same_adapter_as_one_process(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(WORKER), str(tmp_path / "fsdp")]
    completed = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    completed = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "single")], env=_env(),
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    sharded = load_file(str(tmp_path / "fsdp" / "kasa_adapter.safetensors"))
    single = load_file(str(tmp_path / "single" / "kasa_adapter.safetensors"))
    assert sharded.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], atol=1e-5, rtol=1e-4, msg=key)
    assert all(single[k].abs().sum() > 0 for k in single if k.endswith("lora_B"))  # it trained
