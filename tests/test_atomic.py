"""Nothing lost: writes are atomic, a SIGKILL mid-write leaves the previous output whole, a full
disk or a failed check changes nothing, and an adapter is never overwritten without --force.

The kill tests run the real ``lorafx`` console script with a ``sitecustomize`` that makes the
final write stop half way (the file is truncated to half its bytes, then the process sleeps),
so the kill lands while a partial file exists, deterministically.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lora_fx
from lora_fx.adapter.peft import read_adapter, write_adapter
from lora_fx.errors import LoraFxError
from lora_fx.fileio import (atomic_dir, atomic_path, check_creatable_dir, exchange, io_error,
                            made_dirs, sweep_stale)
from lora_fx.load.model import load_model
from tests.helpers import TINY, fill_disk, randomize_lora, tmpfs

SLOW_WRITES = '''
import os, sys, time
from pathlib import Path

def _stall(path):
    """Leave the file half written, say where, and wait to be killed."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    print("MIDWRITE", path, file=sys.__stderr__, flush=True)
    time.sleep(600)

if os.environ.get("LORAFX_TEST_STALL") == "onnx":
    import lora_fx.onnx.save  # the writer of files under the external-data size
    _write = lora_fx.onnx.save.write_model
    def write_model(model, path):
        _write(model, path)
        _stall(path)
    lora_fx.onnx.save.write_model = write_model
elif os.environ.get("LORAFX_TEST_STALL") == "safetensors":
    import safetensors.torch
    _save_file = safetensors.torch.save_file
    def save_file(tensors, filename, metadata=None):
        _save_file(tensors, filename, metadata=metadata)
        _stall(filename)
    safetensors.torch.save_file = save_file
'''


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _kill_mid_write(args: list[str], cwd: Path, stall: str, hooks: Path) -> Path:
    """Run ``lorafx ARGS`` until its output is half written, SIGKILL it, return the partial."""
    env = {**os.environ, "PYTHONPATH": f"{hooks}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "LORAFX_TEST_STALL": stall}
    proc = subprocess.Popen(["lorafx", *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("MIDWRITE "):
                partial = Path(line.split(" ", 1)[1].strip())
                break
        else:
            raise AssertionError(f"lorafx {' '.join(args)} ended before writing")
        assert partial.exists() and partial.stat().st_size > 0
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return partial


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hooks")
    (folder / "sitecustomize.py").write_text(textwrap.dedent(SLOW_WRITES))
    return folder


def _previous_onnx(path: Path) -> np.ndarray:
    """A small valid ONNX file standing for the user's previous export; returns W."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "previous",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), path)
    return w


def test_sigkill_during_onnx_export_keeps_previous_file(tmp_path: Path, hooks: Path) -> None:
    import onnxruntime as ort

    target = tmp_path / "model.onnx"
    w = _previous_onnx(target)
    before = target.read_bytes()
    partial = _kill_mid_write(["export", str(TINY), "-o", str(target), "--no-verify", "--force"],
                              tmp_path, "onnx", hooks)
    assert partial != target and partial.parent.parent == tmp_path  # a temporary beside it
    assert target.read_bytes() == before
    sess = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    x = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], x @ w)


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    """A trained-looking adapter (random A and B) for the tiny model."""
    tiny = load_model(str(TINY))
    gm = lora_fx.inject(tiny.module, tiny.example_inputs,
                        lora_fx.LoraConfig(r=4, target_modules=["w_in", "head"]))
    randomize_lora(gm, seed=3)
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "README.md").write_text("the user's notes\n")
    return lora_fx.save_adapter(gm, tmp_path / "ad")


def test_sigkill_during_adapter_write_keeps_previous_adapter(adapter_dir: Path,
                                                             hooks: Path) -> None:
    before = _tree(adapter_dir)
    old = read_adapter(adapter_dir)
    args = ["inject", str(TINY), "-t", "w_mid", "-r", "2", "-o", str(adapter_dir), "--force"]
    partial = _kill_mid_write(args, adapter_dir.parent, "safetensors", hooks)
    assert partial.parent.parent == adapter_dir.parent and partial.parent != adapter_dir
    assert _tree(adapter_dir) == before
    again = read_adapter(adapter_dir)
    for site, (a, b) in old.lora.items():
        assert torch.equal(again.lora[site][0], a) and torch.equal(again.lora[site][1], b)
    # the next write completes, keeps the user's other files, and sweeps the dead temporary
    proc = subprocess.run(["lorafx", *args], cwd=adapter_dir.parent, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert not partial.parent.exists()
    assert sorted(p.name for p in adapter_dir.parent.iterdir()) == ["ad"]
    assert set(read_adapter(adapter_dir).lora) == {"w_mid"}
    assert (adapter_dir / "README.md").read_text() == "the user's notes\n"


# --- the primitives, in process -------------------------------------------------------------

def test_atomic_path_failure_leaves_target(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    with pytest.raises(LoraFxError, match="No space left on device"), atomic_path(target) as tmp:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def refuse(path: Path) -> None:
        raise LoraFxError(f"{path} is wrong")

    with pytest.raises(LoraFxError, match="is wrong"), atomic_path(target, verify=refuse) as tmp:
        tmp.write_bytes(b"complete but wrong")
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    if os.name != "nt":  # a new file gets the usual mode, not mkstemp's 0600
        mask = os.umask(0o022)
        os.umask(mask)
        assert target.stat().st_mode & 0o777 == 0o666 & ~mask


def test_atomic_dir_swaps_whole_directory(tmp_path: Path) -> None:
    target = tmp_path / "ad"
    target.mkdir()
    for name, text in (("a", "old a"), ("b", "old b"), ("notes.md", "keep")):
        (target / name).write_text(text)
    (target / "sub").mkdir()
    (target / "sub" / "x").write_text("keep too")
    with pytest.raises(LoraFxError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("new a")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert (target / "a").read_text() == "old a"
    inode = target.stat().st_ino
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("new a")
        (tmp / "b").write_text("new b")
    assert _tree(target) == {"a": b"new a", "b": b"new b", "notes.md": b"keep",
                             "sub/x": b"keep too"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    if exchange(tmp_path / "x", tmp_path / "y"):  # Linux: swapped in one rename
        assert target.stat().st_ino != inode


def test_atomic_dir_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with atomic_dir(tmp_path / "link") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "f").read_text() == "x"


def test_missing_parent_folders_are_made_and_removed_again_on_failure(tmp_path: Path
                                                                      ) -> None:
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a" / "b" / "out.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    with pytest.raises(LoraFxError), atomic_dir(tmp_path / "c" / "d" / "ad") as tmp:
        (tmp / "f").write_text("x")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []  # nothing left behind
    with atomic_path(tmp_path / "a" / "b" / "out.bin") as tmp:
        tmp.write_bytes(b"new")
    with atomic_dir(tmp_path / "c" / "d" / "ad") as tmp:
        (tmp / "f").write_text("x")
    assert _tree(tmp_path) == {"a/b/out.bin": b"new", "c/d/ad/f": b"x"}
    (tmp_path / "a" / "keep").write_text("someone else's")  # a made folder others wrote to
    with pytest.raises(RuntimeError), made_dirs(tmp_path / "a" / "e" / "f"):
        raise RuntimeError("failed")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b", "keep"]


def test_a_folder_that_cannot_be_made_is_refused_before_any_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoraFxError, match=r"cannot be created: .*file is a file"):
        check_creatable_dir(tmp_path / "file" / "a" / "b")
    with pytest.raises(LoraFxError, match="cannot be created"), \
            atomic_path(tmp_path / "file" / "a" / "out.bin"):
        raise AssertionError("not reached")
    check_creatable_dir(tmp_path / "new" / "deeper")  # missing but makeable: fine
    assert not (tmp_path / "new").exists()  # a check makes nothing
    (tmp_path / "ro").mkdir()
    access = os.access  # root writes anywhere: the read-only folder is simulated
    monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and Path(p).name != "ro")
    with pytest.raises(LoraFxError, match=r"ro is not writable"):
        check_creatable_dir(tmp_path / "ro" / "a")


def test_sweep_removes_only_dead_temporaries(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".ad.{dead}.0badc0de.tmp"
    live = tmp_path / f".ad.{os.getpid()}.0badc0de.tmp"
    other = tmp_path / f".other.{dead}.0badc0de.tmp"
    for path in (stale, live, other):
        path.mkdir()
    assert sweep_stale(tmp_path, "ad") == (0 if os.name == "nt" else 1)
    assert live.exists() and other.exists() and stale.exists() == (os.name == "nt")


def test_io_error_reads_safetensors_errors() -> None:
    class SafetensorError(Exception):
        pass

    err = io_error(Path("ad"), SafetensorError("I/O error: No space left (os error 28)"))
    assert err is not None and "No space left on device" in str(err)
    assert io_error(Path("ad"), ValueError("os error 28")) is None
    assert io_error(Path("ad"), LoraFxError("x")) is None


def test_write_adapter_verifies_before_replacing(adapter_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A written adapter that reads back different is never renamed into place."""
    import lora_fx.adapter.peft as adapters

    before = _tree(adapter_dir)
    adapter = read_adapter(adapter_dir)
    real_load = adapters.load_file

    def corrupted(path: str) -> dict[str, torch.Tensor]:
        state = real_load(path)
        key = sorted(state)[0]
        state[key] = state[key] + 1
        return state

    monkeypatch.setattr(adapters, "load_file", corrupted)
    with pytest.raises(LoraFxError, match="reads back different tensors"):
        write_adapter(adapter, adapter_dir, force=True)
    assert _tree(adapter_dir) == before
    with pytest.raises(LoraFxError, match="already holds an adapter"):
        write_adapter(adapter, adapter_dir)
    assert _tree(adapter_dir) == before


def test_save_program_disk_full_keeps_previous(tmp_path: Path, monkeypatch: Any) -> None:
    """ONNX save hitting ENOSPC (simulated, runs anywhere): a LoraFxError, previous intact."""
    import onnx_ir

    import lora_fx.onnx.save
    from lora_fx.onnx.save import save_program

    target = tmp_path / "model.onnx"
    _previous_onnx(target)
    before = target.read_bytes()

    def write_model(model: Any, path: Path) -> None:  # the disk fills up mid-write
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(lora_fx.onnx.save, "write_model", write_model)

    class FullDisk:  # the ONNXProgram interface that save_program uses
        model = onnx_ir.load(str(target))

    with pytest.raises(LoraFxError, match="No space left on device"):
        save_program(FullDisk(), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_write_adapter_disk_full_on_tmpfs(adapter_dir: Path, tmp_path: Path) -> None:
    """A real full disk (a 64 KiB tmpfs): refused in one line, the previous adapter intact."""
    with tmpfs(tmp_path / "full", "64k") as mnt:
        adapter = read_adapter(adapter_dir)
        write_adapter(adapter, mnt / "ad")
        before = _tree(mnt / "ad")
        fill_disk(mnt)
        with pytest.raises(LoraFxError, match="No space left on device"):
            write_adapter(adapter, mnt / "ad", force=True)
        assert _tree(mnt / "ad") == before
        assert sorted(p.name for p in mnt.iterdir()) == ["ad", "filler"]
