"""Tests of lora_fx/capture/: attention dropout, the kept torch.export program."""
