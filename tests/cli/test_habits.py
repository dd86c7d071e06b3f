"""Overwrites, mismatched adapters, error lines and progress (issue 19, groups 4, 5 and 6).

Refusals that must come before any work are shown with a MODEL that does not exist: the
refusal, not the missing model, is what the command reports.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lora_fx
from lora_fx.errors import LoraFxError, LoraFxWarning
from tests.helpers import ROOT, TINY_BERT, randomize_lora, run_cli

MISSING = "no_such_model.py"
TINY = str(ROOT / "examples" / "tiny" / "model.py")


def _error(proc: subprocess.CompletedProcess[str], *paths: Path) -> str:
    """The one error line of a failed command (and nothing else on stderr), at most 200
    characters with each of ``paths`` counted as 10."""
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    short = lines[0]
    for path in sorted(paths, key=lambda p: -len(str(p))):
        short = short.replace(str(path), "x" * 10)
    assert "internal error" not in lines[0] and len(short) <= 200, lines[0]
    return lines[0]


# --- group 4: one overwrite policy, checked before any work ---------------------------------

def test_export_refuses_an_existing_file_or_a_directory_before_any_work(tmp_path: Path
                                                                        ) -> None:
    existing = tmp_path / "m.onnx"
    existing.write_bytes(b"keep me")
    line = _error(run_cli("export", MISSING, "-o", str(existing), check=False), tmp_path)
    assert "m.onnx exists: pass --force" in line and existing.read_bytes() == b"keep me"
    line = _error(run_cli("export", MISSING, "-o", str(tmp_path), check=False), tmp_path)
    assert f"{tmp_path} is a directory: pass a file path" in line
    line = _error(run_cli("export", MISSING, "-o", str(existing), "--force", check=False),
                  tmp_path)
    assert "no_such_model.py does not exist" in line  # --force: on to loading the model


def test_outputs_in_missing_folders_are_made_or_refused_before_any_work(tmp_path: Path
                                                                         ) -> None:
    (tmp_path / "file").write_text("x")
    for args in (["-o", str(tmp_path / "file" / "m.onnx")],
                 ["--kv-cache", "-o", str(tmp_path / "file" / "dir" / "model.onnx")]):
        line = _error(run_cli("export", MISSING, *args, check=False), tmp_path)
        assert "cannot be created: " in line and "file is a file" in line  # not the MODEL
    line = _error(run_cli("export", MISSING, "-o", str(tmp_path / "a" / "b" / "m.onnx"),
                          check=False), tmp_path)
    assert "no_such_model.py does not exist" in line and not (tmp_path / "a").exists()
    run_cli("export", TINY, "-o", str(tmp_path / "a" / "b" / "m.onnx"), "--no-verify")
    run_cli("inject", TINY, "-t", "w_in", "-o", str(tmp_path / "c" / "d" / "ad"))
    assert (tmp_path / "a" / "b" / "m.onnx").is_file()
    assert (tmp_path / "c" / "d" / "ad" / "adapter_model.safetensors").is_file()


def test_inject_refuses_a_directory_whose_config_is_not_an_adapters(tmp_path: Path) -> None:
    config = tmp_path / "adapter_config.json"
    config.write_text('{"model_type": "bert"}')
    line = _error(run_cli("inject", MISSING, "-t", "w_in", "-o", str(tmp_path), check=False),
                  tmp_path)
    assert "adapter_config.json is not an adapter's config" in line
    assert config.read_text() == '{"model_type": "bert"}'


def test_an_adapter_made_for_another_model_is_applied_with_a_warning(tmp_path: Path) -> None:
    from tests.helpers import tiny_gpt2

    base = tiny_gpt2()
    base.name_or_path = "/models/gpt2-mine"
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    cfg = lora_fx.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                             base_model_name_or_path="/models/gpt2-theirs")
    gm = lora_fx.inject(base, (ids,), cfg)
    lora_fx.save_adapter(gm, tmp_path / "a")
    with pytest.warns(LoraFxWarning, match="was made for '/models/gpt2-theirs'.*not "
                                           "'/models/gpt2-mine'"):
        lora_fx.load_adapter(base, (ids,), tmp_path / "a")
    base.name_or_path = "gpt2-theirs"  # a hub name and its local copy are one model
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraFxWarning)
        lora_fx.load_adapter(base, (ids,), tmp_path / "a")


# --- group 5: one line each, no internal error, no ONNX Runtime log lines ----------------------

@pytest.fixture(scope="module")
def embed_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """input_ids [1, seq] (batch fixed to 1) -> Gather on a [97, 4] table."""
    table = numpy_helper.from_array(np.ones((97, 4), np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["hidden"], name="embed")], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "seq", 4])], [table])
    path = tmp_path_factory.mktemp("embed") / "embed.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every ONNX Runtime reads
    onnx.save(model, path)
    return path


def test_inject_records_an_hf_models_directory_as_peft_does(tmp_path: Path) -> None:
    from tests.helpers import tiny_gpt2

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    run_cli("inject", f"hf:{tmp_path / 'gpt2'}", "-t", "c_attn", "-o", str(tmp_path / "a"))
    run_cli("inject", TINY, "-t", "w_in", "-o", str(tmp_path / "b"))
    recorded = [json.loads((tmp_path / d / "adapter_config.json").read_text())[
        "base_model_name_or_path"] for d in ("a", "b")]
    assert recorded == [str(tmp_path / "gpt2"), TINY]  # a model file: its MODEL spec


def test_run_input_errors_are_user_errors(embed_onnx: Path, tmp_path: Path) -> None:
    at = (embed_onnx, tmp_path)
    line = _error(run_cli("run", str(embed_onnx), "-i", "input_ids=rand:1x5:500", check=False),
                  *at)
    assert "ONNX Runtime rejected the inputs" in line and "vocabulary" in line
    line = _error(run_cli("run", str(embed_onnx), "-i", "input_ids=rand:3x5", check=False), *at)
    assert "input input_ids has size 3 on axis 0, the model fixes 1" in line
    assert "ONNX Runtime rejected" in _error(run_cli("run", str(embed_onnx), "-i",
                                                     "input_ids=rand:1x5x2", check=False), *at)
    line = _error(run_cli("run", str(tmp_path), check=False), *at)  # a directory
    assert "is a directory, not an ONNX model" in line
    (tmp_path / "notes.txt").write_text("hello")
    line = _error(run_cli("run", str(tmp_path / "notes.txt"), check=False), *at)
    assert "is not an ONNX model" in line and "Protobuf" not in line
    line = _error(run_cli("run", str(embed_onnx), "--adapter", str(tmp_path), check=False), *at)
    assert "is a directory: `lorafx run` takes an .onnx_adapter file" in line


def test_an_existing_file_as_adapter_dir_is_said_to_be_a_file(tmp_path: Path) -> None:
    from lora_fx.adapter.peft import read_adapter

    (tmp_path / "a.onnx_adapter").write_bytes(b"x")
    with pytest.raises(LoraFxError, match="is an ONNX Runtime adapter file .* not an adapter "
                                          "directory"):
        read_adapter(tmp_path / "a.onnx_adapter")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(LoraFxError, match=f"not an adapter directory: pass {tmp_path}$"):
        read_adapter(tmp_path / "adapter_config.json")


def test_a_site_list_is_three_names_closest_first() -> None:
    from tests.helpers import tiny_llama

    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(LoraFxError) as err:
        lora_fx.inject(tiny_llama(), (ids,), lora_fx.LoraConfig(r=2, target_modules=["q_prj"]))
    text = str(err.value)
    assert len(text) <= 200, text
    assert "closest: model.layers.0.self_attn.q_proj, model.layers.1.self_attn.q_proj, " in text
    assert "+" in text and "more" in text and "lorafx inspect" in text
    assert lora_fx.errors.some(["a", "b", "c", "d", "e"], "d") == "d, a, b +2 more"


# --- group 6: progress on terminals, quiet elsewhere; no library noise ------------------------

def _in_terminal(*args: str) -> str:
    """Run ``lorafx ARGS`` with stderr on a pseudo-terminal; returns what it wrote there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(["lorafx", *args], stdout=subprocess.DEVNULL, stderr=slave,
                            stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=600)
    os.close(master)
    assert proc.returncode == 0, b"".join(chunks)
    return b"".join(chunks).decode("utf-8", "replace")


def test_terminal_shows_the_stage_and_json_stays_quiet(tmp_path: Path) -> None:
    from lora_fx import progress

    shown = _in_terminal("export", str(ROOT / "tests" / "models" / "tiny_llama_b1.py"), "-o",
                         str(tmp_path / "m.onnx"))
    assert any(f"{c} exporting to ONNX (" in shown for c in progress.FRAMES), shown[-500:]
    assert shown.rstrip().endswith("\x1b[K") or "\x1b[K" in shown  # the line is erased
    quiet = _in_terminal("export", str(ROOT / "tests" / "models" / "tiny_llama_b1.py"), "-o",
                         str(tmp_path / "m.onnx"), "--force", "--json")
    assert not any(c in quiet for c in progress.FRAMES), quiet[-500:]


def test_stages_show_past_the_delay_and_are_erased(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import time

    from lora_fx import progress

    monkeypatch.setattr(progress, "DELAY", 0.05)
    stream = io.StringIO()
    progress.enable(True, stream)
    try:
        with progress.stage("capturing the model"):
            with progress.stage("merging the adapter"):
                time.sleep(0.3)
        with progress.stage("quick"):
            pass  # under the delay: nothing drawn
    finally:
        progress.enable(False)
    text = stream.getvalue()
    assert "merging the adapter (0 s)" in text and "quick" not in text
    assert text.endswith("\r\x1b[K")  # the line is erased: only the command's output stays
    with progress.stage("off"):  # disabled (the Python API's default): nothing at all
        time.sleep(0.1)
    assert stream.getvalue() == text


def test_train_first_frame_shows_no_nan(tmp_path: Path) -> None:
    from lora_fx.load.model import load_model_file

    bert = str(TINY_BERT)
    loaded = load_model_file(bert)
    gm = lora_fx.inject(loaded.module, loaded.example_inputs,
                        lora_fx.LoraConfig(r=2, target_modules=["query"]))
    randomize_lora(gm)
    lora_fx.save_adapter(gm, tmp_path / "a")
    shown = _in_terminal("train", bert, "--adapter", str(tmp_path / "a"), "--steps", "3")
    assert "training" in shown and "nan" not in shown.lower(), shown


NOISY_API = """
import onnxruntime as ort, torch, lora_fx
from tests.helpers import tiny_llama
from lora_fx.ort.serving import AdapterSession
ids = torch.randint(1, 97, (2, 8)); mask = torch.ones_like(ids)
gm = lora_fx.inject(tiny_llama(), (ids, mask), lora_fx.LoraConfig(r=2, target_modules=["q_proj"]))
lora_fx.merge(gm)
lora_fx.export_onnx(gm, (ids, mask), "{out}/u.onnx", merge=False)
AdapterSession("{out}/u.onnx")
ort.InferenceSession("{out}/u.onnx", providers=["CPUExecutionProvider"])
print("done")
"""


def test_python_api_prints_no_library_noise(tmp_path: Path) -> None:
    code = Path(lora_fx.__file__).resolve().parent.parent  # the lora_fx under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-c", NOISY_API.format(out=tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip() == "done", proc.stderr
    for noise in ("FutureWarning", "LeafSpec", "torchvision", "appears in graph inputs"):
        assert noise not in proc.stderr, proc.stderr[-2000:]


def test_json_reports_stay_json(tmp_path: Path, embed_onnx: Path) -> None:
    data = json.loads(run_cli("run", str(embed_onnx), "--json", "--repeat", "1").stdout)
    assert data["inputs"] == {"input_ids": [1, 4]}  # fixed batch 1, symbolic length = --dim
