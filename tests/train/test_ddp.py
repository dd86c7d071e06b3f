"""DistributedDataParallel on 2 CPU processes (gloo over loopback): an injected model trains exactly
as one process on the whole batch, and only the LoRA gradients are communicated.

Each rank gets half of every global batch; DDP averages the two shards' gradients, which is the
gradient of the mean loss over the whole batch. After a few SGD steps A and B must agree across
ranks and with a single process (1e-5), and the base weights must be bit-identical to the start.

FSDP2 (``fully_shard``) runs here too (CPU, gloo) and matches the single process. A captured
graph inlines the model's blocks (symbolic_trace keeps only leaf modules, torch.export none), so
the only module whose forward runs is the root: FSDP2 shards the whole model as one group,
which saves memory between steps but all-gathers every base weight in each forward and backward.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lora_fx
from lora_fx.train.distributed import all_bytes, count_communication, shard, wrap_ddp
from tests.helpers import ROOT
from tests.train.distributed_setup import (
    MODELS,
    STEPS,
    batch,
    injected,
    lm_loss,
)


def train(name: str, rank: int, world: int) -> dict[str, Any]:
    """STEPS of SGD on rank ``rank``'s shards (world 1: the whole batch, no DDP)."""
    base, gm = injected(name)
    start = {k: v.clone() for k, v in base.state_dict().items()}
    lora_start = {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}
    model: nn.Module = gm
    stats = None
    if world > 1:
        model = wrap_ddp(gm)
        stats = count_communication(model)  # type: ignore[arg-type]
    _sgd_steps(model, lora_fx.lora_parameters(gm), rank, world)
    return {"lora": {n: p.detach().clone() for n, p in gm.named_parameters()
                     if p.requires_grad}, "lora_start": lora_start,
            "base_unchanged": all(torch.equal(v, start[k]) for k, v in base.state_dict().items()),
            "lora_bytes_per_step": stats.bytes // STEPS if stats else None,
            "trainable_bytes": sum(p.numel() * p.element_size()
                                   for p in lora_fx.lora_parameters(gm)),
            "full_bytes": all_bytes(base)}


def _sgd_steps(model: nn.Module, params: list[torch.Tensor], rank: int, world: int) -> None:
    """STEPS SGD steps (lr 0.5) of ``model`` on this rank's shard of each batch."""
    opt = torch.optim.SGD(params, lr=0.5)
    for step in range(STEPS):
        ids = shard(batch(step), rank, world)
        loss = lm_loss(model(ids), ids)
        opt.zero_grad()
        loss.backward()
        opt.step()


def train_fsdp2(name: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    """The same steps with FSDP2 ``fully_shard`` on the injected graph's root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _, gm = injected(name)
    fully_shard(gm, mesh=init_device_mesh("cpu", (world,)))
    _sgd_steps(gm, [p for p in gm.parameters() if p.requires_grad], rank, world)
    return {n: p.full_tensor().detach().clone()  # type: ignore[attr-defined]
            for n, p in gm.named_parameters() if p.requires_grad}


def _full_finetune_bytes(name: str) -> int:
    """One DDP step with every base parameter trainable: the bytes full fine-tuning sends."""
    base, _ = MODELS[name]()
    ddp = nn.parallel.DistributedDataParallel(base)
    stats = count_communication(ddp)
    ids = shard(batch(0), dist.get_rank(), dist.get_world_size())
    lm_loss(ddp(ids), ids).backward()
    return stats.bytes


def _worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {name: train(name, rank, world) for name in MODELS}
        for name in MODELS:
            results[name]["full_finetune_bytes_per_step"] = _full_finetune_bytes(name)
        results["fsdp2"] = {name: train_fsdp2(name, rank, world) for name in MODELS}
        dist.barrier()  # neither rank tears its sockets down while the other still talks
        part = Path(out) / f"rank{rank}.pt.part"
        torch.save(results, part)
        part.replace(Path(out) / f"rank{rank}.pt")  # a file that exists is a whole result
    finally:
        dist.destroy_process_group()


def _spawn_ranks(out: Path) -> None:
    """Run ``_worker`` on 2 ranks; tolerate a gloo abort that is not lorafx's doing.

    A rank killed by a signal (gloo's C++ transport aborting, seen once in CI as "terminate
    called without an active exception") after both ranks saved their results is reported as a
    warning: the results are whole. Before that, the run is retried once. A Python exception in
    a worker (a real failure) is never retried.
    """
    for attempt in (1, 2):
        store = out / f"store{attempt}"  # a FileStore rendezvous: no TCP port to race for
        try:
            mp.spawn(_worker, args=(2, str(store), str(out)), nprocs=2, join=True)
            return
        except mp.ProcessExitedException as e:
            if all((out / f"rank{r}.pt").exists() for r in range(2)):
                warnings.warn(f"a rank died after saving its results: {e}", stacklevel=1)
                return
            if attempt == 2:
                raise
            warnings.warn(f"a rank died before saving its results, retrying once: {e}",
                          stacklevel=1)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    sys.path.insert(0, str(ROOT))  # the workers import this file as tests.train.test_ddp
    _spawn_ranks(out)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def single() -> dict[str, dict[str, Any]]:
    return {name: train(name, 0, 1) for name in MODELS}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fsdp2_equals_single_process(ddp_results: list[dict[str, Any]],
                                     single: dict[str, dict[str, Any]], name: str) -> None:
    for key, want in single[name]["lora"].items():
        for rank in (0, 1):
            torch.testing.assert_close(ddp_results[rank]["fsdp2"][name][key], want, atol=1e-5,
                                       rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ddp_equals_single_process(ddp_results: list[dict[str, Any]],
                                   single: dict[str, dict[str, Any]], name: str) -> None:
    one = single[name]
    r0, r1 = ddp_results[0][name], ddp_results[1][name]
    assert r0["lora"].keys() == one["lora"].keys() and one["lora"]
    for key, want in one["lora"].items():
        assert torch.equal(r0["lora"][key], r1["lora"][key]), f"ranks disagree on {key}"
        torch.testing.assert_close(r0["lora"][key], want, atol=1e-5, rtol=0)
    moved = [k for k, p in one["lora_start"].items() if not torch.allclose(p, one["lora"][k])]
    assert len(moved) == len(one["lora"]), "training left some A or B unchanged"
    assert r0["base_unchanged"] and r1["base_unchanged"] and one["base_unchanged"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_only_lora_gradients_are_communicated(ddp_results: list[dict[str, Any]],
                                              name: str) -> None:
    r0 = ddp_results[0][name]
    lora, full = r0["lora_bytes_per_step"], r0["full_finetune_bytes_per_step"]
    assert lora == r0["trainable_bytes"]  # exactly A and B, nothing of the base
    assert full == r0["full_bytes"]
    print(f"{name}: {lora:,} bytes/step all-reduced vs {full:,} for full fine-tuning "
          f"({full / lora:.1f}x less)")
    assert lora < full
