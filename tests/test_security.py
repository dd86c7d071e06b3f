"""No code from files: adapters load from safetensors only, a pickle is refused with advice and
never opened, corrupt safetensors headers are one-line errors, and nothing in lora_fx/ can
unpickle (a scan of its source).

The malicious payload creates a file when unpickled; a control test proves that it does (with
``torch.load(weights_only=False)``), so the tests that find no file mean something.
"""

from __future__ import annotations

import ast
import json
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

import lora_fx
from lora_fx.adapter.peft import read_adapter
from lora_fx.errors import LoraFxError
from lora_fx.load.model import load_model
from tests.helpers import ROOT, TINY


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appears if anyone unpickles."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _evil_bin(path: Path, marker: Path) -> None:
    """A PEFT-style adapter_model.bin (torch.save zip) whose tensor dict carries the payload."""
    torch.save({"base_model.model.w_in.lora_A.weight": Payload(marker),
                "base_model.model.w_in.lora_B.weight": torch.zeros(64, 4)}, path)


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tiny = load_model(str(TINY))
    gm = lora_fx.inject(tiny.module, tiny.example_inputs,
                        lora_fx.LoraConfig(r=4, target_modules=["w_in"]))
    return lora_fx.save_adapter(gm, tmp_path_factory.mktemp("good") / "ad")


def test_payload_is_live(tmp_path: Path) -> None:
    """Control: the payload really runs code under a plain unpickle, and weights_only stops it."""
    marker = tmp_path / "pwned"
    _evil_bin(tmp_path / "evil.bin", marker)
    with pytest.raises(Exception, match="[Ww]eights only"):
        torch.load(tmp_path / "evil.bin", weights_only=True)
    assert not marker.exists()
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert marker.exists()


def _pickle_dir(tmp_path: Path, good: Path, marker: Path, keep_safetensors: bool) -> Path:
    ad = tmp_path / "evil"
    shutil.copytree(good, ad)
    if not keep_safetensors:
        (ad / "adapter_model.safetensors").unlink()
    _evil_bin(ad / "adapter_model.bin", marker)
    return ad


def test_pickle_adapter_refused_by_api(tmp_path: Path, good_adapter: Path) -> None:
    marker = tmp_path / "pwned"
    ad = _pickle_dir(tmp_path, good_adapter, marker, keep_safetensors=False)
    tiny = load_model(str(TINY))
    for load in (lambda: read_adapter(ad),
                 lambda: lora_fx.load_adapter(tiny.module, tiny.example_inputs, ad)):
        with pytest.raises(LoraFxError, match=r"is a pickle, which lorafx never loads: "
                                              r"convert it to safetensors"):
            load()
    assert not marker.exists()


def test_pickle_adapter_refused_by_cli(tmp_path: Path, good_adapter: Path) -> None:
    marker = tmp_path / "pwned"
    ad = _pickle_dir(tmp_path, good_adapter, marker, keep_safetensors=False)
    proc = subprocess.run(["lorafx", "export", str(TINY), "--adapter", str(ad), "-o",
                           str(tmp_path / "out.onnx")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "adapter_model.bin is a pickle" in proc.stderr
    assert "safe_serialization=True" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "out.onnx").exists()


def test_pickle_beside_safetensors_is_never_opened(tmp_path: Path, good_adapter: Path) -> None:
    marker = tmp_path / "pwned"
    ad = _pickle_dir(tmp_path, good_adapter, marker, keep_safetensors=True)
    adapter = read_adapter(ad)
    assert set(adapter.lora) == {"w_in"} and not marker.exists()


def test_pickle_named_safetensors_is_refused(tmp_path: Path, good_adapter: Path) -> None:
    marker = tmp_path / "pwned"
    ad = tmp_path / "evil"
    shutil.copytree(good_adapter, ad)
    _evil_bin(ad / "adapter_model.safetensors", marker)
    with pytest.raises(LoraFxError, match="is not a readable safetensors file"):
        read_adapter(ad)
    assert not marker.exists()


def _safetensors(header: dict[str, Any] | bytes, data: bytes = b"", length: int | None = None
                 ) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


KEY = "base_model.model.w_in.lora_A.weight"
CORRUPT = {
    "header_length_huge": _safetensors({}, length=2**62),
    "header_length_past_end": _safetensors({}, length=1000),
    "header_not_json": _safetensors(b"{not json at all}"),
    "header_not_utf8": _safetensors(b"\xff\xfe\xfd\xfc"),
    "offsets_past_end": _safetensors({KEY: {"dtype": "F32", "shape": [4, 32],
                                            "data_offsets": [0, 512]}}, b"\0" * 16),
    "offsets_inverted": _safetensors({KEY: {"dtype": "F32", "shape": [1, 1],
                                            "data_offsets": [4, 0]}}, b"\0" * 4),
    "shape_mismatch": _safetensors({KEY: {"dtype": "F32", "shape": [4, 32],
                                          "data_offsets": [0, 8]}}, b"\0" * 8),
    "unknown_dtype": _safetensors({KEY: {"dtype": "PICKLE", "shape": [1],
                                         "data_offsets": [0, 4]}}, b"\0" * 4),
    "overlapping": _safetensors({KEY: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                 "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                                b"\0" * 4),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_safetensors_header(tmp_path: Path, good_adapter: Path, name: str) -> None:
    ad = tmp_path / "ad"
    shutil.copytree(good_adapter, ad)
    (ad / "adapter_model.safetensors").write_bytes(CORRUPT[name])
    with pytest.raises(LoraFxError) as info:
        read_adapter(ad)
    message = str(info.value)
    assert "\n" not in message
    assert "is not a readable safetensors file" in message or "holds no tensors" in message


# --- nothing in lora_fx/ can unpickle ---------------------------------------------------------

UNPICKLERS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve",
              "_pickle"}


def _violations(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) \
                else [node.module or ""]
            found += [f"{where}: imports {n}" for n in names if n.split(".")[0] in UNPICKLERS]
        if not isinstance(node, ast.Call):
            continue
        func, kw = node.func, {k.arg: k.value for k in node.keywords}
        if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
            found.append(f"{where}: calls {func.id}()")
        if isinstance(func, ast.Attribute) and func.attr == "load" and \
                isinstance(func.value, ast.Name) and func.value.id == "torch":
            ok = isinstance(kw.get("weights_only"), ast.Constant) and \
                kw["weights_only"].value is True
            if not ok:
                found.append(f"{where}: torch.load without weights_only=True")
        if isinstance(func, ast.Attribute) and func.attr == "load" and \
                isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value:
            found.append(f"{where}: load(allow_pickle=True)")
    return found


def test_library_source_never_unpickles() -> None:
    files = sorted((ROOT / "lora_fx").rglob("*.py"))
    assert files
    assert [v for f in files for v in _violations(f)] == []


def test_scan_catches_what_it_should(tmp_path: Path) -> None:
    bad = tmp_path / "probe.py"
    bad.write_text("import pickle\nimport torch\nimport numpy as np\n"
                   "torch.load('x')\ntorch.load('x', weights_only=False)\n"
                   "torch.load('x', weights_only=True)\n"
                   "np.load('x', allow_pickle=True)\neval('1')\n")
    assert len(_violations(bad)) == 5
