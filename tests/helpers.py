"""Shared test helpers, the one copy of each: paths, MODEL files imported by path, tiny HF
models from configs, random A/B, PEFT twins, the hand-written LoRA references, the CLI.

The references never read lorafx's own state: the caller writes the scale s = alpha / r (or
alpha / sqrt(r) with rsLoRA, :func:`lora_scale`) and each site's weight layout, known from the
op form: ``nn.Linear``, ``F.linear``, ``x @ W.t()``, conv and MultiheadAttention's
``in_proj_weight`` keep W as [out, in] ("out_in"); ``x @ W``, ``mm`` / ``addmm`` with W [in, out],
HF's Conv1D and embeddings keep it as [in, out] ("in_out", ΔW transposed). Only A and B, the
numbers under test, are read from the injected model.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lora_fx
from lora_fx.api import export_onnx
from lora_fx.onnx.verify import flat_outputs
from lora_fx.ort.runtime import open_session, run

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny" / "model.py"             # functional MLP: every linear form
GPT3 = ROOT / "examples" / "gpt3_175b" / "model.py"        # GPT-3 / RoBERTa shapes, gpt3_small
TINY_BERT = ROOT / "tests" / "models" / "tiny_bert.py"     # BERT classifier MODEL file
TINY_LAYOUTS = {"w_in": "out_in", "w_mid": "out_in", "w_up": "in_out", "head": "out_in"}


# --- MODEL files and tiny models ------------------------------------------------------------
def load_model_file(path: Path) -> ModuleType:
    """The Python file ``path`` (a MODEL file such as examples/tiny/model.py) imported by path as
    a fresh module, not registered in sys.modules (each call builds its own)."""
    name = "lorafx_test_" + "_".join(path.resolve().relative_to(ROOT).with_suffix("").parts)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_mlp() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """examples/tiny: (build_model(), example_inputs())."""
    mod = load_model_file(TINY)
    return mod.build_model(), mod.example_inputs()


def gpt3_small() -> nn.Module:
    """examples/gpt3_175b's small GPT (2 blocks, d 64, vocab 97); all sites nn.Linear."""
    return load_model_file(GPT3).gpt3_small()  # type: ignore[no-any-return]


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel  # optional dependency (tests only)

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=32,
                     use_cache=False, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel  # optional dependency (tests only)

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                     intermediate_size=64, vocab_size=97, max_position_embeddings=32)
    return BertModel(cfg, add_pooling_layer=True).eval()


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM  # optional dependency (tests only)

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, vocab_size=97,
                      max_position_embeddings=32, use_cache=False, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def injected_gpt3_small(seed: int = 3) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(base, injected, ids): gpt3_small with r = 4, lora_alpha = 8 on q_proj, v_proj, fc_in
    (nn.Linear), random A and B."""
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(seed))
    base = gpt3_small()
    gm = lora_fx.inject(base, (ids,), lora_fx.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc_in"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(gm):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return base, gm, ids


def token_ids(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --- A and B ---------------------------------------------------------------------------------
def randomize_lora(gm: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Random A and B at every site (B = 0 would let a broken merge pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in lora_fx.branches(gm).values():
            for w in (branch.lora_A.weight, branch.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=g) * scale)


def factors(gm: nn.Module, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The site's (A, B) in PEFT's layout, detached: the only numbers read from lorafx."""
    branch = lora_fx.branches(gm)[site]
    return branch.lora_A.weight.detach(), branch.lora_B.weight.detach()


def peft_model_like(base: nn.Module, gm: nn.Module, **cfg: Any) -> nn.Module:
    """PEFT's model for ``base`` (deep-copied) carrying the A/B of lorafx's ``gm``."""
    import peft  # the reference implementation (tests only)

    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    state = {}
    for name, b in lora_fx.branches(gm).items():
        state[f"base_model.model.{name}.lora_A.default.weight"] = b.lora_A.weight.detach()
        state[f"base_model.model.{name}.lora_B.default.weight"] = b.lora_B.weight.detach()
    result = pm.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return pm.eval()


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a captured HF causal LM's output (a dict), else its first output."""
    return out["logits"] if isinstance(out, dict) else out[0]


def count_calls(gm: nn.Module, name: str) -> int:
    """call_function nodes of ``gm`` whose target's name contains ``name``."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target))


# --- two PEFT adapters on one model (mixed-batch references) ----------------------------
PAIR_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # a1: r 4, a2: r 8; other sites
    "gpt2": (dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
             dict(r=8, lora_alpha=5, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "llama": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
              dict(r=8, lora_alpha=5, target_modules=["q_proj", "o_proj", "down_proj"])),
}


def peft_pair(base: nn.Module, kind: str, out: Path, seed: int = 0,
              scale: float = 0.1) -> nn.Module:
    """PEFT's model holding adapters a1 and a2 with random A, B, saved to out/a1, out/a2."""
    import peft  # the reference implementation (tests only)

    c1, c2 = PAIR_CONFIGS[kind]
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **c1),
                             adapter_name="a1")
    pm.add_adapter("a2", peft.LoraConfig(init_lora_weights=False, **c2))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    pm.save_pretrained(str(out))
    assert (out / "a1" / "adapter_config.json").is_file() and (out / "a2").is_dir()
    return pm.eval()


# --- hand-written references -----------------------------------------------------------------
def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def hand_delta_weight(a: torch.Tensor, b: torch.Tensor, s: float, shape: torch.Size,
                      layout: str) -> torch.Tensor:
    """ΔW written out for each layout: [out, in] s·BA, [in, out] its transpose, conv reshaped."""
    if a.dim() > 2:  # conv: B [out, r, 1…] · A [r, in, *k]
        return s * torch.einsum("or,rik->oik", b.flatten(1), a.flatten(2)).reshape(shape)
    delta = s * (b @ a)
    return delta if layout == "out_in" else delta.T


def site_weight_path(model: nn.Module, site: str) -> str:
    """The parameter a site names: ``<site>.weight`` of a module, else the parameter ``<site>``
    itself (a functional weight such as ``w_in`` or ``in_proj_weight``)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return f"{site}.weight" if f"{site}.weight" in params else site


def site_weight(model: nn.Module, site: str) -> nn.Parameter:
    return model.get_parameter(site_weight_path(model, site))


def hand_merged(base: nn.Module, gm: nn.Module, layouts: Mapping[str, str],
                scale: float | Mapping[str, float]) -> nn.Module:
    """A deep copy of ``base`` with W + ΔW written into each site's weight: ``layouts`` names
    every site of ``gm`` with its layout, ``scale`` is s (one for all, or per site)."""
    assert set(layouts) == set(lora_fx.branches(gm)), (sorted(layouts), list(lora_fx.branches(gm)))
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for site, layout in layouts.items():
            a, b = factors(gm, site)
            s = scale[site] if isinstance(scale, Mapping) else scale
            w = site_weight(ref, site)
            w += hand_delta_weight(a, b, s, w.shape, layout)
    return ref.eval()


def ort_outputs(path: Path, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.asarray(o)) for o in run(open_session(path), inputs)]


def check_merged_onnx(gm: nn.Module, base: nn.Module, inputs: tuple[Any, ...],
                      want: Any, out: Path) -> dict[str, Any]:
    """Merged ONNX == ``want`` within 1e-4 and its op histogram == the base export's."""
    gm.eval()
    merged = export_onnx(gm, inputs, out / "merged.onnx", merge=True)
    plain = export_onnx(base, inputs, out / "base.onnx", merge=False, verify=False)
    got = ort_outputs(merged.path, inputs)
    for g, w in zip(got, flat_outputs(want), strict=True):
        torch.testing.assert_close(g, w.detach(), rtol=1e-4, atol=1e-4)
    assert merged.op_histogram == plain.op_histogram
    return {"onnx_merged": merged, "onnx_base": plain, "onnx_got": got}


def saved_and_checked(base: nn.Module, inputs: tuple[Any, ...], config: dict[str, Any],
                      seed: int, out: Path) -> dict[str, Any]:
    """``base`` injected with ``config``, A and B random (``seed``, scale 0.3), saved to
    out/adapter and loaded by PEFT; PEFT's output is the reference the merged ONNX must equal
    (``check_merged_onnx``). Returns gm, peft, want and the ONNX results."""
    import peft  # the reference implementation (tests only)

    gm = lora_fx.inject(base, inputs, lora_fx.LoraConfig(**config))
    randomize_lora(gm, seed=seed, scale=0.3)
    lora_fx.save_adapter(gm, out / "adapter")
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), out / "adapter").eval()
    with torch.no_grad():
        want = ref(*inputs)
    onnx = check_merged_onnx(gm, lora_fx.capture(base, inputs), inputs, want, out)
    return {"gm": gm, "peft": ref, "want": want, **onnx}


# --- the CLI and the file system -------------------------------------------------------------
def run_cli(*args: str | Path, cwd: Path | None = None, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the installed ``lorafx`` console script."""
    proc = subprocess.run(["lorafx", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lorafx {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


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


REAL_SESSION = ort.InferenceSession


class FakeCuda:
    """Records the providers asked for; runs the CPU session; reports CUDA when asked."""

    calls: list[list[Any]] = []
    refuse_tf32_option = False

    def __init__(self, path: str, sess_options: Any = None, providers: Any = None,
                 **kwargs: Any) -> None:
        FakeCuda.calls.append(list(providers or []))
        names = [p if isinstance(p, str) else p[0] for p in providers or []]
        if FakeCuda.refuse_tf32_option and any(
                isinstance(p, tuple) and "use_tf32" in p[1] for p in providers or []):
            raise RuntimeError("Unknown CUDA provider option: use_tf32")
        self._real = REAL_SESSION(path, sess_options=sess_options,
                                  providers=["CPUExecutionProvider"], **kwargs)
        self._providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] \
            if "CUDAExecutionProvider" in names else ["CPUExecutionProvider"]

    def get_providers(self) -> list[str]:
        return self._providers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)
