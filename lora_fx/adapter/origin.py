"""Whether an adapter was made for the model it is applied to: its ``base_model_name_or_path``.

PEFT records what ``from_pretrained`` was given (a hub name or a directory); lorafx records the
same for a transformers model (``config.name_or_path``: ``hf:DIR``'s DIR) and ``lorafx inject``
a model file's MODEL spec (``path/model.py``); older adapters hold ``hf:DIR`` itself. Two
names are the same model when they are equal once ``hf:`` and ``:factory`` are stripped,
resolve to the same path, or (hub names against directories) end in the same path component.
An adapter whose name matches none of the model's names gets a warning: same site names and
shapes do not make it the same model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

from ..errors import LoraFxWarning


def _forms(name: str) -> set[str]:
    """The comparable forms of a model name or spec."""
    text = name.strip()
    if text.startswith("hf:"):
        text = text[3:]
    if ".py:" in text:
        text = text.split(".py:")[0] + ".py"
    text = text.rstrip("/")
    forms = {text}
    path = Path(text).expanduser()
    if path.exists():
        forms.add(str(path.resolve()))
    if not text.endswith(".py") and path.name:
        forms.add(path.name)  # "gpt2" == ".../gpt2": a hub name and its local copy
    return forms


def same_model(recorded: str, names: Iterable[str | None]) -> bool:
    """Whether ``recorded`` names one of ``names`` (see the module docstring)."""
    mine = set().union(*(_forms(n) for n in names if n))
    return not mine or bool(_forms(recorded) & mine)


def warn_if_other_model(recorded: object, names: Iterable[str | None], where: str) -> bool:
    """Warn (LoraFxWarning) when the adapter's recorded base model is not the model ``names``
    name; True if it warned. No record, no warning."""
    if not isinstance(recorded, str) or not recorded.strip():
        return False
    names = [n for n in names if n]
    if same_model(recorded, names):
        return False
    warnings.warn(f"{where} was made for {recorded!r} (base_model_name_or_path), not "
                  f"{names[0]!r}: check that it is the adapter of this model", LoraFxWarning,
                  stacklevel=3)
    return True
