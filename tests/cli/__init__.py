"""Tests of lora_fx/cli/: the ``lorafx`` command."""
