"""Tests of lora_fx/train/: fast graphs, DDP / FSDP2, the HF Trainer."""
