"""Run by tests/test_ddp.py under torchrun: a few KasaTrainer steps with DDP (gloo, CPU), then each rank dumps
its adapter tensors so the test can check that all ranks hold the same adapter."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from kasa_peft import KasaConfig, KasaTrainer, get_kasa_model


class Tokens(Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (32, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(out_dir: Path) -> None:
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=64))
    model = get_kasa_model(base, KasaConfig(r=2, target_modules="all-linear", beta=1e-2, gamma=1e-2))
    args = TrainingArguments(output_dir=str(out_dir / "trainer"), per_device_train_batch_size=2, max_steps=3,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             ddp_backend="gloo", disable_tqdm=True)
    trainer = KasaTrainer(model=model, args=args, train_dataset=Tokens())
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    state = {k: v.contiguous() for k, v in model.adapter_state_dict().items()}
    save_file(state, str(out_dir / f"rank{rank}.safetensors"), metadata={"world_size": str(world)})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
