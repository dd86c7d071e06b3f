"""Tests of lora_fx/ort/: adapter files, optimized sessions, serving."""
