"""lora_fx.capture.program: the kept torch.export program is reused by the ONNX export of a
merged graph (no second trace), and refused for any graph it does not describe."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lora_fx
from lora_fx.capture.program import PROGRAM_KEY, captured_program
from lora_fx.graph.state import get_state
from lora_fx.ort import runtime
from tests.helpers import logits_of, peft_model_like, randomize_lora, tiny_gpt2, token_ids


@contextmanager
def _traces() -> Iterator[list[int]]:
    """Records each torch.export.export call made inside (a second trace shows up here)."""
    traced: list[int] = []
    real = torch.export.export

    def spy(*args: Any, **kwargs: Any) -> Any:
        traced.append(1)
        return real(*args, **kwargs)

    torch.export.export = spy  # type: ignore[assignment]
    try:
        yield traced
    finally:
        torch.export.export = real  # type: ignore[assignment]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny GPT-2: merged export through the captured program, and the base export."""
    base = tiny_gpt2()
    ids = token_ids()
    gm = lora_fx.inject(base, (ids,), lora_fx.LoraConfig(r=4, lora_alpha=8,
                                                         target_modules=["c_attn"]))
    randomize_lora(gm, seed=1)
    out = tmp_path_factory.mktemp("fast")
    with _traces() as traced:
        merged = lora_fx.export_onnx(gm, (ids,), out / "m.onnx", merge=True)
    base_gm = lora_fx.capture(base, (ids,))
    base_rep = lora_fx.export_onnx(base_gm, (ids,), out / "b.onnx")
    return {"base": base, "gm": gm, "merged": merged, "base_rep": base_rep, "traced": traced}


def test_merged_export_reuses_capture_and_matches_peft(exported: dict[str, Any]) -> None:
    assert not exported["traced"], "export_onnx traced the model a second time"
    assert exported["merged"].max_abs_diff <= 1e-4
    assert exported["merged"].op_histogram == exported["base_rep"].op_histogram
    probe = token_ids(3, 11, seed=9)  # another batch and length: the axes stayed dynamic
    pm = peft_model_like(exported["base"], exported["gm"], r=4, lora_alpha=8,
                         target_modules=["c_attn"])
    want = logits_of(pm(probe)).detach().numpy()
    got = runtime.run(runtime.open_session(exported["merged"].path), (probe,))[0]
    assert np.abs(got - want).max() <= 1e-4


def test_captured_program_refuses_other_graphs(exported: dict[str, Any]) -> None:
    gm = exported["gm"]
    assert PROGRAM_KEY in gm.meta
    assert captured_program(gm) is None              # branches still in the graph
    assert captured_program(lora_fx.merge(gm)) is not None
    plain = torch.nn.Linear(3, 3)
    assert captured_program(plain) is None        # no capture at all


def test_captured_program_refuses_untied_merge() -> None:
    """A LoRA on GPT-2's tied lm_head: the merge unties it, so the graph reads a new weight."""
    base = tiny_gpt2()
    ids = token_ids()
    gm = lora_fx.inject(base, (ids,), lora_fx.LoraConfig(r=4, target_modules=["lm_head"]))
    randomize_lora(gm)
    merged = lora_fx.merge(gm)
    assert captured_program(merged) is None              # its carried program: refused


def test_merged_module_exports_without_a_second_trace(tmp_path: Path) -> None:
    """merge(gm) carries the capture's graph without its weights: export_onnx(merged,
    merge=False) traces nothing, matches PEFT's unmerged model (random B) on another shape,
    and the carried program keeps no unmerged weight alive."""
    base = tiny_gpt2()
    ids = token_ids()
    gm = lora_fx.inject(base, (ids,), lora_fx.LoraConfig(r=4, lora_alpha=8,
                                                         target_modules=["c_attn"]))
    randomize_lora(gm, seed=2)
    probe = token_ids(3, 11, seed=5)
    pm = peft_model_like(base, gm, r=4, lora_alpha=8, target_modules=["c_attn"])
    want = logits_of(pm(probe)).detach().numpy()
    merged = lora_fx.merge(gm)
    assert all(t.is_meta for t in merged.meta[PROGRAM_KEY].state_dict.values())
    state = get_state(gm)
    assert state is not None
    unmerged = [weakref.ref(gm.get_parameter(rec.weight)) for rec in state.sites.values()]
    del gm, base, state
    gc.collect()
    assert all(ref() is None for ref in unmerged)
    with _traces() as traced:
        report = lora_fx.export_onnx(merged, (ids,), tmp_path / "m.onnx", merge=False)
    assert not traced, "export_onnx traced the merged module again"
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    got = runtime.run(runtime.open_session(report.path), (probe,))[0]
    assert np.abs(got - want).max() <= 1e-4

