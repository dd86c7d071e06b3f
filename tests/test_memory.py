"""lora_fx.memory: ONNX exports run without full collections over old objects
(collector_frozen); freed heap memory goes back to the system (trim)."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx import memory


class _Node:
    def __init__(self) -> None:
        self.other: Any = self


def test_collector_frozen_freezes_old_objects_and_thaws_on_exit() -> None:
    old = [_Node() for _ in range(100)]
    assert gc.get_freeze_count() == 0
    with memory.collector_frozen():
        assert gc.get_freeze_count() >= len(old)
        young = _Node()  # a cycle made inside is still collected inside
        ref = weakref.ref(young)
        del young
        gc.collect()
        assert ref() is None
    assert gc.get_freeze_count() == 0


def test_collector_frozen_thaws_when_the_phase_raises() -> None:
    with pytest.raises(RuntimeError), memory.collector_frozen():
        raise RuntimeError("export failed")
    assert gc.get_freeze_count() == 0


def test_collector_frozen_leaves_a_callers_freeze_alone() -> None:
    """A process that froze its own objects (a pre-fork server) keeps them frozen."""
    mine = [_Node() for _ in range(100)]
    gc.freeze()
    try:
        with memory.collector_frozen():
            pass
        # still frozen (an unfreeze would make it 0); frozen objects that die meanwhile
        # leave the count, so it is not compared exactly
        assert gc.get_freeze_count() >= len(mine)
    finally:
        gc.unfreeze()


def test_export_runs_frozen(tmp_path: Any, monkeypatch: Any) -> None:
    """torch.onnx.export (inside export_onnx) runs inside the freeze, except for a release."""
    seen: list[int] = []
    real = torch.onnx.export

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(gc.get_freeze_count())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(2, 8)
    gm = lora_fx.inject(model, (x,), lora_fx.LoraConfig(r=2, target_modules=["0"]))
    lora_fx.export_onnx(gm, (x,), tmp_path / "m.onnx", verify=False)
    assert len(seen) == 1 and seen[0] > 0
    assert gc.get_freeze_count() == 0
    lora_fx.export_onnx(gm, (x,), tmp_path / "m.onnx", verify=False, release=True)
    assert seen[1:] == [0]  # memory first: garbage made before the export is not kept


TRIM_CHILD = """
import torch
from lora_fx import memory
def anon():
    f = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
    return int(f["RssAnon"].split()[0]) * 1024
big = torch.ones(16 << 20, dtype=torch.uint8); del big  # glibc's mmap threshold rises to 16 MB
blocks = [torch.ones(8 << 20, dtype=torch.uint8) for _ in range(10)]  # so these come from the heap
pin = torch.ones(4 << 20, dtype=torch.uint8)  # above them: the heap's top stays in use
del blocks  # 80 MB free inside the heap, still resident
before = anon()
print(int(memory.trim()), before - anon())
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_trim_returns_freed_heap_memory() -> None:
    """memory.trim (run after an in-place merge and around a big export): freed tensors that
    glibc kept in its heap stop being resident."""
    out = subprocess.run([sys.executable, "-c", TRIM_CHILD], capture_output=True, text=True,
                         check=True).stdout.split()
    if out[0] == "0":
        pytest.skip("this C library has no malloc_trim")
    assert int(out[1]) > 60 << 20  # of the 80 MB freed

