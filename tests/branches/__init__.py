"""Tests of lora_fx/branches/: conv, embedding and fused-slice LoRA branches."""
