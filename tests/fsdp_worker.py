"""Run by tests/test_fsdp.py: a few KaSA training steps on a tiny LLaMA, either FSDP2-sharded under torchrun (gloo,
CPU; each rank takes its half of the global batch) or in one process on the whole batch; then the adapter is saved."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from kasa_peft import KasaConfig, get_kasa_model
from kasa_peft.fsdp import unsharded

GLOBAL_BATCH, STEPS = 4, 3


def build():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=64))
    return get_kasa_model(base, KasaConfig(r=2, target_modules="all-linear", beta=1e-2, gamma=1e-2))


def main(out_dir: Path) -> None:
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model = build()
    if distributed:
        from torch.distributed.fsdp import fully_shard

        # KaSA first (its truncation reads whole weights), then shard: the adapters are sharded with their blocks.
        for block in model.base_model.model.layers:
            fully_shard(block)
        fully_shard(model.base_model)
        lora_a = model.base_model.model.layers[0].self_attn.q_proj.kasa_adapters["default"].lora_A
        assert type(lora_a).__name__ == "DTensor" and lora_a.to_local().shape[0] == lora_a.shape[0] // world
    ids = torch.randint(0, 64, (GLOBAL_BATCH, 8), generator=torch.Generator().manual_seed(1))
    local = ids.chunk(world)[rank]  # equal token counts per rank: the mean of rank means is the global mean
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(STEPS):
        loss = model(input_ids=local, labels=local).loss + model.regularization_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with unsharded(model):
        if rank == 0:
            model.save_pretrained(out_dir)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
