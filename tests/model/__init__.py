"""Tests of lora_fx/model/: inject/merge semantics, planning, merge precision."""
