"""Quickstart report: adapter size against model size, merged-vs-base ONNX latency, and the
merged ONNX model's accuracy on the held-out set, run in ONNX Runtime.

Usage: python examples/quickstart/report.py OUT_DIR
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

from lora_fx.ort import runtime

HERE = Path(__file__).resolve().parent


def latency_ms(path: Path, feeds: dict[str, np.ndarray], repeats: int = 30) -> float:
    """Median wall time of one run, after warm-up."""
    sess = runtime.open_session(path)
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(out: Path) -> None:
    sys.path.insert(0, str(HERE))
    import model as quickstart  # the MODEL file

    adapter = out / "adapter" / "adapter_model.safetensors"
    weights = quickstart.model_path() / "model.safetensors"
    print(f"adapter size: {adapter.stat().st_size / 1e6:.2f} MB vs model "
          f"{weights.stat().st_size / 1e6:.1f} MB "
          f"({100 * adapter.stat().st_size / weights.stat().st_size:.2f}%)")
    sess = runtime.open_session(out / "model.onnx")
    correct = total = 0
    for (ids, mask), labels in quickstart.eval_batches():
        logits = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        correct += int((logits.argmax(-1) == labels.numpy()).sum())
        total += len(labels)
    print(f"merged ONNX model in ONNX Runtime ({runtime.session_provider(sess)}): held-out "
          f"accuracy {correct / total:.4f}")
    ids, mask = quickstart.example_inputs()
    for batch in (1, 8):
        feeds = {"input_ids": ids[:batch].numpy(), "attention_mask": mask[:batch].numpy()}
        merged = latency_ms(out / "model.onnx", feeds)
        base = latency_ms(out / "base.onnx", feeds)
        print(f"latency batch {batch}: merged {merged:.2f} ms vs base {base:.2f} ms "
              f"(ratio {merged / base:.3f})")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/quickstart"))
