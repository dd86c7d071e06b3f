"""Tests of lora_fx/variants/: DoRA, PiSSA / OLoRA, rsLoRA, LoRA+."""
