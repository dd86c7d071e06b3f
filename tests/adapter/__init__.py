"""Tests of lora_fx/adapter/: PEFT's format, surgery, rank analysis."""
