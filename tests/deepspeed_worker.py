"""Run by tests/test_deepspeed.py under torchrun: a ZeRO-3 partitioned model (deepspeed.zero.Init) gets KaSA adapters;
each truncation must come from the gathered (whole) weight, which this worker checks against a float64 SVD."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from kasa_peft import KasaConfig, get_kasa_model


def main() -> None:
    dist.init_process_group("gloo")
    import deepspeed

    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 2, "zero_optimization": {"stage": 3}}):
        model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 8))
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters()), "not partitioned"
    kasa = get_kasa_model(model, KasaConfig(r=2, target_modules=["0", "1"]))
    for index in range(2):
        layer = kasa.base_model[index]
        adapter = layer.kasa_adapters["default"]
        with deepspeed.zero.GatheredParameters([layer.base_layer.weight]):
            u, s, vh = torch.linalg.svd(layer.base_layer.weight.double(), full_matrices=False)
        reference = (u[:, -2:] * s[-2:]) @ vh[-2:]
        torch.testing.assert_close((adapter.minor_u_sigma @ adapter.minor_vh).double(), reference, atol=1e-6, rtol=1e-5)
    print(f"rank {dist.get_rank()}: truncation of gathered ZeRO-3 weights ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
