"""FSDP2 per transformer block of an injected model (``train.distributed.shard_blocks``), on
2 CPU processes (gloo): the same losses and LoRA gradients as one process on the whole batch,
and each rank holding about half of the model's parameter bytes.

The capture inlines the blocks; ``split_blocks`` cuts them back out as submodules, each its own
``fully_shard`` group (the root holds the embeddings, head and tied weights). Each rank gets
half of every global batch; FSDP averages the shards' gradients, which is the gradient of the
mean loss over the whole batch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import FSDPModule

import lora_fx
from lora_fx.train.distributed import local_bytes, shard, shard_blocks, split_blocks
from tests.train.distributed_setup import MODELS, STEPS, batch, injected, lm_loss


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def run(name: str, rank: int, world: int) -> dict[str, Any]:
    """STEPS SGD steps; world 1: the whole batch on ``split_blocks`` (no FSDP), else each
    rank's shard on ``shard_blocks``. Returns losses, first-step LoRA gradients, final LoRA
    parameters, this rank's and the whole model's parameter bytes, and the block count."""
    _, gm = injected(name)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        model = shard_blocks(gm, mesh=init_device_mesh("cpu", (world,)))
    else:
        model = split_blocks(gm)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    losses, grads = [], {}
    for step in range(STEPS):
        ids = shard(batch(step), rank, world)
        loss = lm_loss(model(ids), ids)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            grads = {n: _full(p.grad) for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        losses.append(float(loss.detach()))
    here, whole = local_bytes(model)
    return {"losses": losses, "grads": grads, "bytes": (here, whole),
            "lora": {n: _full(p) for n, p in model.named_parameters() if p.requires_grad},
            "blocks": sum(n.startswith("block_") for n, _ in model.named_children()),
            "groups": sum(isinstance(m, FSDPModule) for m in model.modules()),
            "lora_count": len(lora_fx.lora_parameters(model))}


def _worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {name: run(name, rank, world) for name in MODELS}
        dist.barrier()
        part = Path(out) / f"rank{rank}.pt.part"
        torch.save(results, part)
        part.replace(Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("fsdp")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the workers import this file
    mp.spawn(_worker, args=(2, str(out / "store"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def single() -> dict[str, dict[str, Any]]:
    return {name: run(name, 0, 1) for name in MODELS}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_per_block_fsdp2_equals_one_process(sharded: list[dict[str, Any]],
                                            single: dict[str, dict[str, Any]],
                                            name: str) -> None:
    one, r0, r1 = single[name], sharded[0][name], sharded[1][name]
    assert r0["blocks"] == one["blocks"] == 2
    assert r0["groups"] == 3 and one["groups"] == 0  # one FSDP group per block, and the root
    assert one["lora_count"] == len(one["lora"]) and one["lora"]
    for step, want in enumerate(one["losses"]):  # equal shards: the mean of the ranks' means
        assert (r0["losses"][step] + r1["losses"][step]) / 2 == pytest.approx(want, abs=1e-5)
    for key, want in one["grads"].items():
        for r in (r0, r1):
            torch.testing.assert_close(r["grads"][key], want, atol=1e-5, rtol=1e-4)
    for key, want in one["lora"].items():
        for r in (r0, r1):
            torch.testing.assert_close(r["lora"][key], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_rank_holds_about_half_the_parameters(sharded: list[dict[str, Any]],
                                                   name: str) -> None:
    for r in sharded:
        here, whole = r[name]["bytes"]
        print(f"{name}: {here:,} of {whole:,} parameter bytes on this rank ({here / whole:.3f})")
        assert 0.45 <= here / whole <= 0.56
