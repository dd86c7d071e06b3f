"""Tests of lora_fx/plugins/: the ``hf:DIR`` plugin."""
