"""Tests of lora_fx/onnx/: streaming save, rewrite rules, unmerged and big exports."""
