"""lora_fx.onnx.trace: what the exporter is run with."""

from __future__ import annotations

import logging

from lora_fx.onnx.trace import quiet_exporter


def test_exporter_constant_folding_log_is_quiet_during_export() -> None:
    """onnxscript logs "Evaluation failed: ..." (a constant left unfolded, not an error) as a
    warning; lorafx's exports silence it, and only while exporting."""
    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    before = folding.level
    with quiet_exporter():
        assert not folding.isEnabledFor(logging.WARNING)
    assert folding.level == before

