"""Tests of lora_fx/passes/: the runner, untying, GELU fusion, wide linears."""
