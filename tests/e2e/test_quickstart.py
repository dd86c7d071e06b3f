"""The README's first command, with fewer steps: accuracy improves, ONNX matches PyTorch."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.helpers import ROOT


def test_quickstart_improves_accuracy(tmp_path: Path) -> None:
    env = dict(os.environ, QUICKSTART_STEPS=os.environ.get("QUICKSTART_STEPS", "80"),
               QUICKSTART_OUT=str(tmp_path / "qs"))
    proc = subprocess.run(["bash", str(ROOT / "examples/quickstart/run.sh")], env=env,
                          capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    before, after = map(float, re.search(r"held-out accuracy: ([\d.]+) -> ([\d.]+)", out).groups())
    assert after > before + 0.1, out
    diffs = [float(x) for x in re.findall(r"max \|ONNX Runtime - PyTorch\| = ([\d.e+-]+)", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-4
    assert re.search(r"trainable: [\d,]+ / [\d,]+ \([\d.]+%\)", out)
    assert "adapter size:" in out and "latency batch 1: merged" in out
    onnx_acc = float(re.search(r"held-out accuracy ([\d.]+)", out).group(1))
    assert abs(onnx_acc - after) < 0.02, out
