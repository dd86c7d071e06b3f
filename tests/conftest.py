"""pytest set-up for the whole suite: offline Hugging Face, quiet transformers. Helpers live in
tests/helpers.py (``from tests.helpers import ...``), not here."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
