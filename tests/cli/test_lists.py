"""List options: ``-t q_proj,v_proj``, ``-t q_proj v_proj`` and ``-t q_proj -t v_proj`` (issue 24).
"""

from __future__ import annotations

import json

import pytest

from lora_fx.cli.inject import inject_command
from lora_fx.cli.lists import spread_list_values
from lora_fx.cli.plan import plan_command
from tests.helpers import TINY, run_cli


@pytest.mark.parametrize("args, expected", [
    (["M", "-t", "a", "b", "-o", "D"], ["M", "-t", "a", "-t", "b", "-o", "D"]),
    (["-t", "a", "b", "M", "-o", "D"], ["-t", "a", "-t", "b", "M", "-o", "D"]),
    (["-t", "a", "M"], ["-t", "a", "M"]),  # the MODEL after one target stays the MODEL
    (["-t", "a", "b", "-o", "D", "M"], ["-t", "a", "-t", "b", "-o", "D", "M"]),
    (["M", "--target=a", "b"], ["M", "--target=a", "--target", "b"]),
    (["M", "-ta", "b"], ["M", "-ta", "-t", "b"]),
    (["M", "-o", "D", "x"], ["M", "-o", "D", "x"]),  # -o is no list: x stays an extra argument
    (["M", "-t", "a", "--modules-to-save", "h1", "h2"],
     ["M", "-t", "a", "--modules-to-save", "h1", "--modules-to-save", "h2"]),
    (["M", "--alpha", "-8", "-t", "a", "b"], ["M", "--alpha", "-8", "-t", "a", "-t", "b"]),
    (["-t", "a", "--", "M"], ["-t", "a", "--", "M"]),
])
def test_values_after_one_flag_become_repeated_flags(args: list[str], expected: list[str]
                                                     ) -> None:
    assert spread_list_values(args, inject_command.params) == expected


@pytest.mark.parametrize("command", [inject_command, plan_command])
@pytest.mark.parametrize("targets", [["w_in,w_mid"], ["w_in", "w_mid"], ["w_in, w_mid"]])
def test_every_form_gives_the_same_targets(command: object, targets: list[str]) -> None:
    import click

    assert isinstance(command, click.Command)
    ctx = command.make_context(command.name, [str(TINY), "-t", *targets, "--json"])
    assert ctx.params["targets"] == ("w_in", "w_mid")
    ctx = command.make_context(command.name, [str(TINY), "-t", "w_in", "-t", "w_mid"])
    assert ctx.params["targets"] == ("w_in", "w_mid")


def test_inject_takes_a_peft_users_target_list() -> None:
    for args in (["-t", "w_in", "w_mid", "--modules-to-save", "head"],
                 ["-t", "w_in,w_mid", "--modules-to-save", "head"]):
        out = json.loads(run_cli("inject", TINY, *args, "--dry-run", "--json").stdout)
        assert [s["name"] for s in out["sites"]] == ["w_in", "w_mid"]
        assert out["modules_to_save"] == ["head"]


def test_an_extra_argument_says_how_to_pass_several_names() -> None:
    proc = run_cli("inject", TINY, "stray", "-t", "w_in", "--dry-run", check=False)
    assert proc.returncode == 2, proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert "unexpected extra argument (stray)" in line
    assert "-t q_proj,v_proj or -t q_proj -t v_proj" in line
