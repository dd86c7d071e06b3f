"""Integrations with training frameworks users already run (``hf_trainer``: transformers'
``Trainer``). Each is imported only when used, so lorafx never requires the framework."""
