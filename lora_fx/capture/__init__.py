"""Capture: a model as a torch.fx GraphModule (symbolic_trace, else torch.export), its fix-ups
(dropout, attention dropout), dynamic shapes and the kept program."""
