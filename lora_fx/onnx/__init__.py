"""Emit ONNX: prepare (merged / unmerged / lowered) → trace or reuse the capture → save → verify.

This package imports onnx and onnxscript: ``import lora_fx`` does not import it until an export."""
