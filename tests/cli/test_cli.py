"""The installed `lorafx` command through subprocess: inspect, inject, train, export, errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tests.helpers import TINY, TINY_BERT, load_model_file, run_cli


def test_inspect_lists_sites_and_json() -> None:
    out = run_cli("inspect", TINY, "--json")
    data = json.loads(out.stdout)
    names = {s["name"]: s["form"] for s in data["sites"]}
    assert names == {"w_in": "F.linear", "w_mid": "matmul", "w_up": "matmul", "head": "nn.Linear"}
    table = run_cli("inspect", TINY_BERT).stdout
    assert "bert.encoder.layer.0.attention.self.query" in table


def test_inject_json_counts_equal_peft(tmp_path: Path) -> None:
    import peft

    out = run_cli("inject", TINY_BERT, "-t", "query", "-t", "value", "-r", "4", "--alpha", "8",
                  "--modules-to-save", "classifier", "-o", str(tmp_path / "ad"), "--json")
    data = json.loads(out.stdout)  # stdout holds the JSON and nothing else
    assert len(data["sites"]) == 4
    mod = load_model_file(TINY_BERT)
    pm = peft.get_peft_model(copy.deepcopy(mod.build_model()), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    assert (data["trainable_params"], data["total_params"]) == tuple(
        pm.get_nb_trainable_parameters())
    # what inject wrote loads in PEFT with no missing or unexpected LoRA keys
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(mod.build_model()),
                                            str(tmp_path / "ad"))
    state = peft.get_peft_model_state_dict(loaded)
    from safetensors.torch import load_file

    assert set(state) == set(load_file(str(tmp_path / "ad" / "adapter_model.safetensors")))


def test_inject_table_dry_run_and_refusal(tmp_path: Path) -> None:
    out = run_cli("inject", TINY, "-t", "w_in", "-t", "w_up", "-r", "2", "-o",
                  str(tmp_path / "ad"))
    assert "trainable:" in out.stdout and "%" in out.stdout
    before = (tmp_path / "ad" / "adapter_model.safetensors").read_bytes()
    again = run_cli("inject", TINY, "-t", "w_mid", "-o", str(tmp_path / "ad"), check=False)
    assert again.returncode != 0 and "--force" in again.stderr
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == before
    run_cli("inject", TINY, "-t", "w_mid", "-o", str(tmp_path / "ad"), "--force")
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() != before
    dry = run_cli("inject", TINY, "-t", "w_in", "--dry-run", "--json")
    assert json.loads(dry.stdout)["trainable_params"] == 8 * (32 + 64)
    assert not (tmp_path / "none").exists()


def test_train_then_export_merged_and_base(tmp_path: Path) -> None:
    ad = str(tmp_path / "ad")
    run_cli("inject", TINY, "-t", "w_in", "-t", "w_mid", "-r", "4", "-o", ad)
    out = run_cli("train", TINY, "--adapter", ad, "--steps", "60", "--lr", "1e-2", "--json")
    report = json.loads(out.stdout)
    assert report["eval_after"]["loss"] < report["eval_before"]["loss"]
    from safetensors.torch import load_file

    b = load_file(f"{ad}/adapter_model.safetensors")["base_model.model.w_in.lora_B.weight"]
    assert b.abs().sum() > 0
    merged = json.loads(run_cli("export", TINY, "--adapter", ad, "-o",
                                str(tmp_path / "m.onnx"), "--json").stdout)
    base = json.loads(run_cli("export", TINY, "-o", str(tmp_path / "b.onnx"), "--json").stdout)
    assert merged["op_histogram"] == base["op_histogram"]
    assert merged["max_abs_diff"] < 1e-4 and merged["provider"] == "CPUExecutionProvider"
    text = run_cli("export", TINY, "--adapter", ad, "-o", str(tmp_path / "m2.onnx")).stdout
    assert "verified: max |ONNX Runtime - PyTorch|" in text and "CPUExecutionProvider" in text


@pytest.mark.parametrize("args, needle", [
    (["inspect", "/nonexistent/model.py"], "does not exist"),
    (["inject", TINY, "-t", "w_inn", "--dry-run"], "closest: w_in"),
    (["inject", TINY, "-t", "w_in", "-r", "0", "--dry-run"], "must be an integer >= 1"),
])
def test_basic_errors_are_one_line(args: list[str | Path], needle: str) -> None:
    proc = run_cli(*args, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_model_in_file(tmp_path: Path) -> None:
    f = tmp_path / "empty.py"
    f.write_text("x = 1\n")
    proc = run_cli("inspect", str(f), check=False)
    assert proc.returncode == 1 and "has no model" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


