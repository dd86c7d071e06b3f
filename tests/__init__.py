"""The lorafx test suite: one folder per lora_fx/ folder, plus e2e/ (families, properties, the
CLI error matrix, quickstart, benchmark smoke run). Shared helpers: tests/helpers.py."""
