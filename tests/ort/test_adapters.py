"""``.onnx_adapter`` files from lorafx and PEFT adapter dirs: A' = Aᵀ, B' = s·Bᵀ per site
(rank/alpha patterns, rsLoRA), names checked against an unmerged model, zeros for missing
sites; read back and run with ONNX Runtime's own API against a hand-merged reference."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import lora_fx
from lora_fx.adapter.peft import Adapter, write_adapter
from lora_fx.api import export_onnx
from lora_fx.config import LoraConfig
from lora_fx.errors import LoraFxError
from lora_fx.ort.adapters import convert_adapter, model_slots, read_ort_adapter
from tests.helpers import TINY_LAYOUTS, lora_scale, tiny_mlp

SHAPES = {"w_in": (64, 32), "w_mid": (64, 64), "w_up": (32, 64)}  # TinyMLP sites: (out, in)


def make_adapter(seed: int, sites: list[str], r: int = 4, alpha: float = 8,
                 **config: Any) -> Adapter:
    """Random A and B (never B = 0) in PEFT's layout, A (r, in), B (out, r)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=sites, **config)
    lora = {}
    for site in sites:
        out_f, in_f = SHAPES[site]
        k = cfg.rank_for(site)
        lora[site] = (torch.randn(k, in_f, generator=gen) * 0.3,
                      torch.randn(out_f, k, generator=gen) * 0.3)
    return Adapter(cfg, lora)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The functional MLP exported unmerged (fp32 and fp16) with a w_in/w_up adapter."""
    tmp = tmp_path_factory.mktemp("ort_adapters")
    model, (x,) = tiny_mlp()
    write_adapter(make_adapter(0, ["w_in", "w_up"]), tmp / "exported")
    gm = lora_fx.load_adapter(model, (x,), tmp / "exported")
    export_onnx(gm, (x,), tmp / "m.onnx", merge=False)
    export_onnx(gm, (x,), tmp / "m16.onnx", merge=False, dtype="fp16")
    return {"tmp": tmp, "model": model, "x": x, "path": tmp / "m.onnx",
            "path16": tmp / "m16.onnx"}


def test_parameters_are_transposed_with_the_site_scale_folded(tmp_path: Path) -> None:
    adapter = make_adapter(1, ["w_in", "w_mid", "w_up"], r=4, alpha=6, use_rslora=True,
                           rank_pattern={"w_mid": 2}, alpha_pattern={"w_up": 3})
    write_adapter(adapter, tmp_path / "ad")
    report = convert_adapter(tmp_path / "ad", tmp_path / "a.onnx_adapter")
    assert report.sites == {"w_in": 4, "w_mid": 2, "w_up": 4} and report.dtype == "fp32"
    params = read_ort_adapter(tmp_path / "a.onnx_adapter")
    scales = {"w_in": lora_scale(6, 4, rslora=True), "w_mid": lora_scale(6, 2, rslora=True),
              "w_up": lora_scale(3, 4, rslora=True)}
    assert len(params) == 6
    for site, s in scales.items():
        a, b = (t.numpy() for t in adapter.lora[site])
        np.testing.assert_array_equal(params[f"{site}.lora_A.weight"], a.T)
        np.testing.assert_allclose(params[f"{site}.lora_B.weight"], s * b.T, rtol=1e-6)
    fmt = ort.AdapterFormat.read_adapter(str(tmp_path / "a.onnx_adapter"))
    assert fmt.get_adapter_version() == 1 and fmt.get_model_version() == 1


def test_peft_saved_dir_converts_with_peft_scaling(tmp_path: Path) -> None:
    import peft

    base = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10))
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=3, lora_alpha=7, target_modules=["0", "2"], rank_pattern={"2": 5},
        init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "peft"))
    params = read_ort_adapter(convert_adapter(tmp_path / "peft", tmp_path / "p.onnx_adapter")
                              .path)
    for site in ("0", "2"):
        layer = pm.base_model.model[int(site)]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        s = layer.scaling["default"]
        assert params[f"{site}.lora_A.weight"].shape[1] == (3 if site == "0" else 5)
        np.testing.assert_allclose(params[f"{site}.lora_A.weight"], a.detach().numpy().T)
        np.testing.assert_allclose(params[f"{site}.lora_B.weight"], s * b.detach().numpy().T,
                                   rtol=1e-6)


def test_model_slots_of_an_unmerged_export(tiny_export: dict[str, Any]) -> None:
    slots = model_slots(tiny_export["path"])
    assert {k: (v.in_features, v.out_features, v.dtype) for k, v in slots.items()} == {
        "w_in": (32, 64, "fp32"), "w_up": (64, 32, "fp32")}
    assert {v.dtype for v in model_slots(tiny_export["path16"]).values()} == {"fp16"}


def merged_by_hand(model: nn.Module, adapter: Adapter, s: float) -> nn.Module:
    """W' = W + s·B@A by hand ([in, out] w_up gets the transpose), on a deep copy."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for site, (a, b) in adapter.lora.items():
            delta = s * (b.double() @ a.double())
            w = getattr(ref, site)
            w += (delta if TINY_LAYOUTS[site] == "out_in" else delta.t()).float()
    return ref.eval()


def test_runs_in_onnxruntime_with_missing_sites_zero(tiny_export: dict[str, Any]) -> None:
    """An adapter on w_in only (rank 6), filled with zeros for w_up from the model, equals the
    hand merge of w_in alone; run with ONNX Runtime's LoraAdapter API."""
    tmp = tiny_export["tmp"]
    adapter = make_adapter(2, ["w_in"], r=6, alpha=4)
    write_adapter(adapter, tmp / "w_in_only")
    report = convert_adapter(tmp / "w_in_only", tmp / "w.onnx_adapter",
                             model=tiny_export["path"])
    assert report.filled == ["w_up"]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(tiny_export["path"]), opts,
                                providers=["CPUExecutionProvider"])
    handle = ort.LoraAdapter()
    handle.Load(str(tmp / "w.onnx_adapter"))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(handle)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()}, run_options)
    with torch.no_grad():
        want = merged_by_hand(tiny_export["model"], adapter, lora_scale(4, 6))(x).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_names_and_dims_are_checked_against_the_model(tiny_export: dict[str, Any]) -> None:
    tmp = tiny_export["tmp"]
    write_adapter(make_adapter(3, ["w_mid"]), tmp / "mid")
    with pytest.raises(LoraFxError, match="'w_mid' is not an adapter input.*closest"):
        convert_adapter(tmp / "mid", tmp / "mid.onnx_adapter", model=tiny_export["path"])
    odd = make_adapter(3, ["w_in"])
    odd.lora["w_in"] = (torch.randn(4, 31), torch.randn(64, 4))
    write_adapter(odd, tmp / "odd")
    with pytest.raises(LoraFxError, match="31->64 but .* has 32->64"):
        convert_adapter(tmp / "odd", tmp / "odd.onnx_adapter", model=tiny_export["path"])
    write_adapter(make_adapter(4, ["w_in"]), tmp / "in_only")
    with pytest.raises(LoraFxError, match="no weights for site 'w_up'"):
        convert_adapter(tmp / "in_only", tmp / "x.onnx_adapter", model=tiny_export["path"],
                        fill_missing=False)
    assert not (tmp / "mid.onnx_adapter").exists() and not (tmp / "x.onnx_adapter").exists()


def test_dtype_follows_the_model(tiny_export: dict[str, Any]) -> None:
    tmp = tiny_export["tmp"]
    report = convert_adapter(tmp / "exported", tmp / "e16.onnx_adapter",
                             model=tiny_export["path16"])
    assert report.dtype == "fp16"
    assert {v.dtype for v in read_ort_adapter(report.path).values()} == {np.dtype("float16")}
    with pytest.raises(LoraFxError, match="disagrees"):
        convert_adapter(tmp / "exported", tmp / "e32.onnx_adapter", dtype="fp32",
                        model=tiny_export["path16"])
    bf16 = convert_adapter(tmp / "exported", tmp / "b.onnx_adapter", dtype="bf16")
    params = ort.AdapterFormat.read_adapter(str(bf16.path)).get_parameters()
    assert {v.data_type() for v in params.values()} == {"tensor(bfloat16)"}


def test_refusals(tmp_path: Path) -> None:
    adapter = make_adapter(5, ["w_in"])
    adapter.saved = {"head.weight": torch.zeros(4, 32)}
    write_adapter(adapter, tmp_path / "saved")
    with pytest.raises(LoraFxError, match="modules_to_save.*merged"):
        convert_adapter(tmp_path / "saved", tmp_path / "s.onnx_adapter")
    write_adapter(make_adapter(5, ["w_in"]), tmp_path / "ok")
    out = tmp_path / "ok.onnx_adapter"
    out.write_bytes(b"user's file")
    with pytest.raises(LoraFxError, match="already exists.*--force"):
        convert_adapter(tmp_path / "ok", out)
    assert out.read_bytes() == b"user's file"
    convert_adapter(tmp_path / "ok", out, force=True)
    assert set(read_ort_adapter(out)) == {"w_in.lora_A.weight", "w_in.lora_B.weight"}
    with pytest.raises(LoraFxError, match="does not exist"):
        convert_adapter(tmp_path / "nope", tmp_path / "n.onnx_adapter")
    with pytest.raises(LoraFxError, match="no LoRA adapter inputs"):
        base = export_onnx(nn.Linear(3, 2), (torch.randn(1, 3),), tmp_path / "b.onnx",
                           verify=False)
        convert_adapter(tmp_path / "ok", tmp_path / "m.onnx_adapter", model=base.path)


def test_cli_convert_adapter(tiny_export: dict[str, Any]) -> None:
    from lora_fx.cli.deploy import convert_adapter_command as command

    tmp = tiny_export["tmp"]
    out = tmp / "cli.onnx_adapter"
    args = [str(tmp / "exported"), "-o", str(out), "--model", str(tiny_export["path"])]
    result = CliRunner().invoke(command, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["sites"] == {"w_in": 4, "w_up": 4} and data["filled_with_zeros"] == []
    again = CliRunner().invoke(command, args)
    assert isinstance(again.exception, LoraFxError)
    text = CliRunner().invoke(command, [*args, "--force"])
    assert text.exit_code == 0 and "names and shapes match" in text.output
