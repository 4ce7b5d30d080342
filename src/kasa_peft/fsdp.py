"""FSDP2 (``torch.distributed.fsdp.fully_shard``) helpers.

KaSA needs nothing special to *train* under FSDP2: wrap the model with ``get_kasa_model`` first (the truncation
reads whole weights), then ``fully_shard`` its blocks; the adapter tensors are parameters of those blocks, so they
shard, all-gather and reduce-scatter like any other parameter. To *save*, the adapter must be whole again::

    with unsharded(model):               # collective: every rank enters
        if dist.get_rank() == 0:
            model.save_pretrained(out_dir)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every ``fully_shard``-ed module of ``model`` holds whole (unsharded) parameters; resharded on exit.

    Collective: all ranks must enter it together. A no-op for a model without FSDP2 modules.
    """
    from torch.distributed.fsdp import FSDPModule

    sharded = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for module in sharded:
        module.unshard()
    try:
        yield model
    finally:
        for module in sharded:
            module.reshard()


def whole(tensor):
    """A ``DTensor`` shard (FSDP2 parameter outside forward) as the whole tensor, differentiably; others unchanged.

    Used by the regulariser, which runs outside the model's forward where FSDP2 parameters are sharded. The
    gradient flows back to this rank's shard; every rank computes the same term, so no reduction is needed.
    """
    if tensor is None or type(tensor).__name__ != "DTensor":
        return tensor
    return tensor.full_tensor()
