"""List options (``-t``, ``--modules-to-save``) in the three forms users type.

PEFT users write a target list as they would in Python: ``-t q_proj v_proj``. lorafx takes that,
``-t q_proj,v_proj`` and ``-t q_proj -t v_proj`` alike. Values after one flag are spread into
repeated flags before click parses (click has no "one or more values" option); the command's
positional arguments are kept: a run of values that swallowed the MODEL gives it back, so
``lorafx inject -t q_proj MODEL`` and ``lorafx inject MODEL -t q_proj v_proj -o DIR`` both work.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import click

_SEPARATORS = re.compile(r"[,\s]+")
HINT = "several names: -t q_proj,v_proj or -t q_proj -t v_proj"


class ListOption(click.Option):
    """A repeatable option whose values may also be comma-separated (``-t a,b``); with
    :class:`ListCommand`, also space-separated after one flag (``-t a b``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["multiple"] = True
        super().__init__(*args, **kwargs)

    def type_cast_value(self, ctx: click.Context, value: Any) -> Any:
        """Each given value split on commas and spaces; empty pieces dropped."""
        items = super().type_cast_value(ctx, value)
        return tuple(part for item in items for part in _SEPARATORS.split(str(item)) if part)


class ListCommand(click.Command):
    """A command whose :class:`ListOption` flags take every value that follows them."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, spread_list_values(args, self.params))
        except click.UsageError as err:
            if "unexpected extra argument" not in err.message:
                raise
            raise click.UsageError(f"{err.message}; {HINT}", ctx) from None


def spread_list_values(args: Sequence[str], params: Sequence[click.Parameter]) -> list[str]:
    """``args`` with the values following a :class:`ListOption`'s value turned into repeated
    flags (``-t a b`` -> ``-t a -t b``), except the last ones where the required positional
    arguments would otherwise be missing (``-t a MODEL`` stays as it is)."""
    takes_value = {opt: not (isinstance(p, click.Option) and (p.is_flag or p.count))
                   for p in params if isinstance(p, click.Option) for opt in p.opts}
    lists = {opt for p in params if isinstance(p, ListOption) for opt in p.opts}
    items: list[list[str]] = []  # groups of tokens; a spread value is [flag, value]
    spread: list[int] = []  # indices in items of spread values, in order
    rest = list(args)
    while rest:
        token = rest.pop(0)
        items.append([token])
        if token == "--":
            items.extend([t] for t in rest)
            break
        flag = _flag_of(token)
        if flag is None or not takes_value.get(flag, False):
            continue  # a positional or a flag: nothing more to take
        if token == flag and rest:  # its value is the next token (not --opt=value or -tVALUE)
            items[-1].append(rest.pop(0))
        while flag in lists and rest and not rest[0].startswith("-"):
            spread.append(len(items))
            items.append([flag, rest.pop(0)])
    for index in spread[len(spread) - _missing_positionals(items, spread, params):]:
        items[index] = items[index][1:]  # given back to a positional argument
    return [token for item in items for token in item]


def _flag_of(token: str) -> str | None:
    """The option a token names (``--target`` of ``--target=a``, ``-t`` of ``-ta``), or None
    for a positional value."""
    if not token.startswith("-") or token == "-":
        return None
    return token.partition("=")[0] if token.startswith("--") else token[:2]


def _missing_positionals(items: list[list[str]], spread: list[int],
                         params: Sequence[click.Parameter]) -> int:
    """How many required positional values are absent once ``spread`` values are options."""
    needed = sum(p.nargs for p in params
                 if isinstance(p, click.Argument) and p.required and p.nargs > 0)
    taken = set(spread)
    found = sum(1 for i, item in enumerate(items)
                if i not in taken and len(item) == 1 and _flag_of(item[0]) is None)
    return max(0, min(needed - found, len(spread)))
