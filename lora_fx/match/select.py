"""Target selection: which sites a LoraConfig targets, as PEFT's target_modules does.
"""

from __future__ import annotations

import dataclasses
import sys

from torch import nn

from ..config import LoraConfig
from ..errors import LoraFxError
from .matcher import Site, Skip
from .rules import FORMS, KINDS

# --- targeting ----------------------------------------------------------------------------
ALL_LINEAR = "all-linear"


SEQ_CLS_HEADS = ("score", "classifier")


def output_heads(model: nn.Module | None, config: LoraConfig) -> set[str]:
    """PEFT's ``all-linear`` exclusions: a PreTrainedModel's output embeddings, else for
    task_type SEQ_CLS its ``score`` / ``classifier``; nothing for other models."""
    pretrained = getattr(sys.modules.get("transformers"), "PreTrainedModel", None)
    if model is None or pretrained is None or not isinstance(model, pretrained):
        return set()
    head = model.get_output_embeddings()  # type: ignore[operator]
    if head is None and config.task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in SEQ_CLS_HEADS if hasattr(model, n)), None)
    return {next(n for n, m in model.named_modules() if m is head)} if head is not None else set()


def _why_not(site: Site, config: LoraConfig, named: LoraConfig, heads: set[str]) -> str | None:
    """None when ``config`` targets ``site``, else the reason (for inspect and plan)."""
    if config.targets_parameter(site.weight):
        return None  # PEFT's target_parameters: LoRA on the parameter at each of its uses
    forms = config.target_forms
    if site.kind == "experts" and not (forms and (site.kind in forms or site.form in forms)):
        return "expert stack: name it in target_parameters"
    if forms and site.form not in forms and site.kind not in forms:
        return f"form {site.form} ({site.kind}) is not in target_forms"
    if config.is_excluded(site.name):
        return "excluded by exclude_modules"
    if config.saves(site.name):
        return "in modules_to_save (trained in full)"
    if config.target_modules is None:
        if not forms:
            return "no target_modules"
        return None if config._layer_ok(site.name) else "not in layers_to_transform"
    if named.targets(site.name):
        return None
    if config.target_modules == ALL_LINEAR:
        return ("output head: all-linear leaves it out, as PEFT" if site.name in heads
                else f"all-linear takes linear forms only, not {site.kind}")
    return "not named by target_modules"


def _check(site: Site, config: LoraConfig) -> None:
    mask = config.slices_for(site.name)
    if mask is not None and (site.kind != "linear" or site.out_features % len(mask)):
        raise LoraFxError(f"enable_lora {mask} cannot apply to site {site.name!r} ({site.kind}, "
                          f"{site.out_features} outputs): it needs a linear site whose outputs "
                          "split evenly; fix the enable_lora key")


def select(sites: list[Site], config: LoraConfig,
           model: nn.Module | None = None) -> tuple[list[Site], list[Skip]]:
    """Split ``sites`` into those ``config`` targets and the rest (each with its reason).

    ``target_modules`` as PEFT (``"all-linear"``: every linear-kind site but the output head,
    expanded to full names first, as PEFT does); ``target_parameters`` as PEFT: every use of a
    named parameter (expert stacks are reached only so, or by ``target_forms``);
    ``target_forms`` (lorafx only) keeps sites whose form or kind it lists, and alone targets
    every such site.
    """
    unknown = sorted(set(config.target_forms or []) - set(FORMS) - set(KINDS))
    if unknown:
        raise LoraFxError(f"target_forms has unknown form {unknown[0]!r}: use a kind "
                          f"({', '.join(KINDS)}) or a form ({', '.join(FORMS)})")
    heads: set[str] = set()
    named = config
    if config.target_modules == ALL_LINEAR:
        heads = output_heads(model, config)
        linear = sorted({s.name for s in sites if s.kind == "linear"} - heads)
        named = dataclasses.replace(config, target_modules=linear)
    chosen: list[Site] = []
    rest: list[Skip] = []
    for site in sites:
        reason = _why_not(site, config, named, heads)
        if reason is None:
            _check(site, config)
            chosen.append(site)
        else:
            rest.append(Skip(site.node, site.name, site.form, reason))
    return chosen, rest

