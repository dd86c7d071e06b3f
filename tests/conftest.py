"""Shared test helpers: tiny HF models from configs, random A/B, PEFT references."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent
LORAFX = [sys.executable, "-m", "lora_fx"]


def randomize_lora(gm: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Random A and B at every site (B = 0 would let a broken merge pass)."""
    import lora_fx

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in lora_fx.branches(gm).values():
            for w in (branch.lora_A.weight, branch.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=g) * scale)


def peft_model_like(base: nn.Module, gm: nn.Module, **cfg: Any) -> nn.Module:
    """PEFT's model for ``base`` (deep-copied) carrying the A/B of lorafx's ``gm``."""
    import peft

    import lora_fx

    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    state = {}
    for name, b in lora_fx.branches(gm).items():
        state[f"base_model.model.{name}.lora_A.default.weight"] = b.lora_A.weight.detach()
        state[f"base_model.model.{name}.lora_B.default.weight"] = b.lora_B.weight.detach()
    result = pm.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return pm.eval()


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=32,
                     use_cache=False, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                     intermediate_size=64, vocab_size=97, max_position_embeddings=32)
    return BertModel(cfg, add_pooling_layer=True).eval()


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, vocab_size=97,
                      max_position_embeddings=32, use_cache=False, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def token_ids(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


def run_cli(*args: str, cwd: Path | None = None, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the installed ``lorafx`` console script."""
    proc = subprocess.run(["lorafx", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lorafx {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def tiny_model_file() -> Path:
    return ROOT / "examples" / "tiny" / "model.py"


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for real full-disk tests, unmounted after; the
    test is skipped where mounting is not allowed (it needs root)."""
    path.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def fill_disk(folder: Path) -> None:
    """Write ``folder/filler`` until its file system is full."""
    with open(folder / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 512)
        except OSError:
            pass
