"""Adapters as data: PEFT's format both ways, surgery (resize, combine), rank analysis."""
