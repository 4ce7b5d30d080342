"""Two-process DDP on the CPU (gloo): adapters trained by KasaTrainer must agree across ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_keeps_adapters_in_sync(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(worker), str(tmp_path)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    with safe_open(str(tmp_path / "rank0.safetensors"), framework="pt") as handle:
        assert handle.metadata()["world_size"] == "2"
    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # Training happened: B moved away from its zero init on every layer.
    assert all(rank0[k].abs().sum() > 0 for k in rank0 if k.endswith("lora_B"))


def test_kasa_train_runs_under_torchrun(tmp_path):
    """The harness goes through the Trainer, so torchrun/accelerate launch give DDP without code changes."""
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               "-m", "kasa_peft.experiments.cli", "train", "--task", "sst2", "--demo-data", "--model", "tiny-bert",
               "--train-limit", "64", "--eval-limit", "32", "--batch-size", "4", "--max-steps", "4",
               "--output-dir", str(tmp_path / "run")]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "complete" and result["global_step"] == 4
    assert "accuracy" in result["final"]
