"""Train a LoRA adapter with DistributedDataParallel, one process per device, under torchrun.

    torchrun --nproc_per_node 2 examples/ddp/train_ddp.py examples/tiny/model.py \\
        -t w_in -t w_mid --steps 50 -o /tmp/tiny_adapter

    # GPUs: the same command; NCCL and one GPU per process are chosen when CUDA is present.
    # Several machines: torchrun --nnodes N --node_rank K --master_addr HOST ...

MODEL is a lorafx model file with ``train_batches()`` and ``loss_fn()`` (as ``lorafx train``).
Every rank builds the same base model (the file must seed its initialization or load a
checkpoint), takes its equal slice of each batch, and DDP averages the LoRA gradients, so a step
is one step on the whole batch. Only A and B are all-reduced: the script prints the bytes per
step against what full fine-tuning would send. Rank 0 writes the adapter (PEFT's layout).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
import torch.distributed as dist

import lora_fx
from lora_fx.load.model import load_model
from lora_fx.train.distributed import all_bytes, count_communication, shard, wrap_ddp


def _shard(value: Any, rank: int, world: int, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return shard(value, rank, world).to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_shard(v, rank, world, device) for v in value)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="path/to/model.py[:factory] with train_batches/loss_fn")
    parser.add_argument("-t", "--target", action="append", required=True)
    parser.add_argument("-r", "--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("-o", "--output", default=None, help="Adapter dir (written by rank 0).")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    loaded = load_model(args.model)
    if loaded.train_batches is None or loaded.loss_fn is None:
        raise SystemExit(f"{args.model} defines no train_batches()/loss_fn()")
    torch.manual_seed(0)  # same A everywhere (DDP also broadcasts rank 0's A and B at start)
    config = lora_fx.LoraConfig(r=args.rank, lora_alpha=args.alpha or args.rank,
                                target_modules=args.target)
    gm = lora_fx.inject(loaded.module, loaded.example_inputs, config).to(device)
    model = wrap_ddp(gm, device_ids=[device.index] if cuda else None)
    stats = count_communication(model)
    opt = torch.optim.AdamW(lora_fx.lora_parameters(gm), lr=args.lr)
    gm.train()
    batches = iter(loaded.train_batches())
    for step in range(args.steps):
        inputs, target = next(batches)
        inputs, target = _shard(inputs, rank, world, device), _shard(target, rank, world, device)
        loss = loaded.loss_fn(model(*inputs), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    if rank == 0:
        trainable, total = lora_fx.count_parameters(gm)
        print(f"all-reduced {stats.bytes // args.steps:,} bytes/step (LoRA, {trainable:,} of "
              f"{total:,} parameters); full fine-tuning would send {all_bytes(loaded.module):,}")
        if args.output:
            lora_fx.save_adapter(gm.cpu(), args.output, force=True)
            print(f"adapter written to {args.output}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
