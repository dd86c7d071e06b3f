"""Data-parallel training of an injected model on torch.distributed: only LoRA gradients travel.

With N ranks each on its shard of the batch, DistributedDataParallel all-reduces (averages) the
gradient of every parameter that requires grad, so one step equals one step of a single process
on the whole batch (for a loss that is a mean over equal shards):

    ∇L = (1/N) Σ_k ∇L_k,    L_k = mean loss of rank k's shard.

After :func:`lora_fx.inject` only A and B (and ``modules_to_save`` copies) require grad, so a
step all-reduces Σ_sites r·(in + out) values instead of the whole model's. :func:`wrap_ddp` also
keeps the frozen base out of DDP's start-up broadcast and its per-step buffer broadcast: every
rank loads the same base weights, and they never change.

Past one GPU's memory, :func:`shard_blocks` shards with FSDP2 per transformer block: the
capture's blocks become submodules again (``passes.split_blocks``), each a ``fully_shard``
group, so that a rank holds 1/N of the weights plus the one block being computed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.fsdp import fully_shard

from ..capture.trace import CAPTURE_KEY
from ..errors import LoraFxError
from ..graph.copy import copy_graph
from ..graph.portable import graph_module
from ..graph.state import STATE_KEY, LoraState, get_state
from ..passes.runner import run_pass
from ..passes.split_blocks import BLOCK_PREFIX, block_of, moved_path, split_blocks_pass


@dataclass
class CommStats:
    """Gradient bytes handed to all-reduce (the buckets' sizes) and the number of buckets."""

    bytes: int = 0
    buckets: int = 0


def trainable_bytes(module: nn.Module) -> int:
    """Bytes of the parameters that require grad: DDP's all-reduce payload per step."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def all_bytes(module: nn.Module) -> int:
    """Bytes of every parameter: full fine-tuning's all-reduce payload per step."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def frozen_names(module: nn.Module) -> list[str]:
    """Fully qualified names of the frozen parameters and of every buffer."""
    names = [n for n, p in module.named_parameters() if not p.requires_grad]
    return names + [n for n, _ in module.named_buffers()]


def wrap_ddp(module: nn.Module, **kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(module)`` that synchronizes only the trainable parameters.

    Frozen parameters and buffers are excluded from DDP (no start-up broadcast of the base model,
    no buffer broadcast per forward): every rank must load the same base weights (and seed the
    same A, B, or load the same adapter: DDP broadcasts rank 0's trainable parameters at start).
    ``kwargs`` go to DDP (``device_ids`` on GPUs).
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise LoraFxError("torch.distributed is not initialized: call "
                          "torch.distributed.init_process_group() first (torchrun sets it up)")
    if not any(p.requires_grad for p in module.parameters()):
        raise LoraFxError("the model has no trainable parameter: inject LoRA first "
                          "(lora_fx.inject) or load an adapter")
    DDP = nn.parallel.DistributedDataParallel
    DDP._set_params_and_buffers_to_ignore_for_model(module, frozen_names(module))
    return DDP(module, **kwargs)


def count_communication(ddp: nn.parallel.DistributedDataParallel) -> CommStats:
    """Count the bytes DDP all-reduces (a communication hook around the default all-reduce)."""

    stats = CommStats()

    def hook(state: CommStats, bucket: Any) -> torch.futures.Future[torch.Tensor]:
        buf = bucket.buffer()
        state.bytes += buf.numel() * buf.element_size()
        state.buckets += 1
        return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]

    # DDP checks the hook's annotations as objects; postponed annotations are strings
    hook.__annotations__ = {"state": CommStats, "bucket": torch.distributed.GradBucket,
                            "return": torch.futures.Future[torch.Tensor]}
    ddp.register_comm_hook(stats, hook)
    return stats


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s equal slice of ``batch`` along dim 0 (its size must divide by world)."""
    if batch.shape[0] % world:
        raise LoraFxError(f"batch of {batch.shape[0]} does not split over {world} ranks: use a "
                          "multiple of the world size (equal shards keep DDP's mean exact)")
    size = batch.shape[0] // world
    return batch[rank * size:(rank + 1) * size]


def split_blocks(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (the same tensors and modules) whose transformer blocks are
    submodules ``block_<i>`` (``passes.split_blocks``), so that each can be its own FSDP2
    group; the LoRA state follows (``lora_parameters`` and ``branches`` work on it)."""
    work = graph_module(gm, copy_graph(gm.graph))
    run_pass("split_blocks", split_blocks_pass, work)
    split = graph_module(work, work.graph)  # holds only what its graph reads: no weight twice
    split.meta[CAPTURE_KEY] = gm.meta.get(CAPTURE_KEY)
    state = get_state(gm)
    if state is not None:
        paths = block_of(split)
        sites = {n: dataclasses.replace(r, weight=moved_path(paths, r.weight),
                                        branch=moved_path(paths, r.branch))
                 for n, r in state.sites.items()}
        split.meta[STATE_KEY] = LoraState(state.config, sites,
                                          [moved_path(paths, s) for s in state.saved])
    split.train(gm.training)
    return split


def shard_blocks(gm: fx.GraphModule, mesh: Any = None, **options: Any) -> fx.GraphModule:
    """FSDP2 per transformer block: ``fully_shard`` on each ``block_<i>`` of
    ``split_blocks(gm)``, then on the root (embeddings, head, tied weights).

    Each block's weights are all-gathered just before it runs and freed after (forward and
    backward), so a rank holds its 1/N shard of every weight plus one block at a time;
    only A, B (and modules_to_save) get gradients, reduce-scattered per block. Train and
    step the returned module (its parameters are the sharded ones, DTensors); ``gm``'s
    parameters are replaced in the shared modules. ``options`` go to ``fully_shard``.
    """
    split = split_blocks(gm)
    for name, child in split.named_children():
        if name.startswith(BLOCK_PREFIX):
            fully_shard(child, mesh=mesh, **options)
    fully_shard(split, mesh=mesh, **options)
    return split


def local_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes of the parameters this rank holds, bytes of the whole model's parameters):
    a sharded parameter (DTensor) counts its local shard against its full size."""
    here = whole = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        here += local.numel() * local.element_size()
        whole += p.numel() * p.element_size()
    return here, whole
