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


def test_accelerate_launch_runs_kasa_trainer_on_two_cpu_processes(tmp_path):
    """The README's `accelerate launch` line (2 processes; gloo on the CPU): ranks end with the same adapter."""
    from safetensors import safe_open

    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(Path(__file__).with_name("ddp_worker.py")), str(tmp_path)]
    completed = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    with safe_open(str(tmp_path / "rank0.safetensors"), framework="pt") as handle:
        assert handle.metadata()["world_size"] == "2"
    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert all(rank0[k].abs().sum() > 0 for k in rank0 if k.endswith("lora_B"))
