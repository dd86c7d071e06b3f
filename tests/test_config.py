"""LoraConfig reads PEFT's adapter_config.json across PEFT releases."""

from __future__ import annotations

import warnings

import pytest

from lora_fx.config import LoraConfig
from lora_fx.errors import LoraFxWarning

BASE = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


@pytest.mark.parametrize("value", [None, False, "", [], {}])
def test_a_newer_peft_field_at_its_off_default_passes_silently(value: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = LoraConfig.from_peft_dict({**BASE, "astra_config": value})
    assert cfg.r == 4


def test_an_unknown_field_that_is_set_is_warned_about() -> None:
    with pytest.warns(LoraFxWarning, match="astra_config are unknown"):
        LoraConfig.from_peft_dict({**BASE, "astra_config": {"k": 1}})
