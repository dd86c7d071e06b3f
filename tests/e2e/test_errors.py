"""The table of bad inputs, each run through the ``lorafx`` CLI in its own process.

Every case asserts: a non-zero exit, exactly one line on stderr that starts with ``error:``
and holds the expected words (what, where, what to do), no traceback, nothing on stdout, and
no file in the case's directory written, removed or changed (a snapshot before and after).
Commands run in children forked from one driver process that imported torch once (see
DRIVER); a few cases, or all with ``LORAFX_REAL_CLI=1``, also through the real console script.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import TINY, fill_disk

ADAPTER = ["-t", "w_in", "-t", "head", "-r", "4"]

MODELS = {  # file name -> source; every case directory gets all of them
    "syntax.py": "import torch\ndef build_model(:\n    pass\n",
    "raises.py": "import torch\nraise RuntimeError('boom at import')\n",
    "sysexit.py": "import sys\nsys.exit(0)\n",
    "build_raises.py": """
        import torch
        def build_model():
            raise ValueError("bad width")
        def example_inputs():
            return (torch.randn(2, 3),)
        """,
    "no_model.py": "import torch\ndef example_inputs():\n    return (torch.randn(2, 3),)\n",
    "returns_int.py": """
        import torch
        def build_model():
            return 3
        def example_inputs():
            return (torch.randn(2, 3),)
        """,
    "no_inputs.py": "import torch\ndef build_model():\n    return torch.nn.Linear(3, 4)\n",
    "inputs_str.py": """
        import torch
        def build_model():
            return torch.nn.Linear(3, 4)
        def example_inputs():
            return "hello"
        """,
    "inputs_numpy.py": """
        import numpy as np
        import torch
        def build_model():
            return torch.nn.Linear(3, 4)
        def example_inputs():
            return (np.zeros((2, 3), dtype="float32"),)
        """,
    "inputs_shape.py": """
        import torch
        def build_model():
            return torch.nn.Sequential(torch.nn.Linear(3, 4))
        def example_inputs():
            return (torch.randn(2, 5),)
        """,
    "inputs_raise.py": """
        import torch
        def build_model():
            return torch.nn.Linear(3, 4)
        def example_inputs():
            return (torch.randn(2, 3) @ torch.randn(4, 4),)
        """,
    "uncapturable.py": """
        import torch
        from torch import nn
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 4)
            def forward(self, x):
                y = self.lin(x)
                if y.sum().item() > 0:
                    return y.nonzero()
                return y
        def build_model():
            return M()
        def example_inputs():
            return (torch.ones(2, 4),)
        """,
    "other.py": """
        import torch
        from torch import nn
        def build_model():
            return nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
        def example_inputs():
            return (torch.randn(2, 32),)
        """,
    "other_shape.py": """
        import torch
        import torch.nn.functional as F
        from torch import nn
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.w_in = nn.Parameter(torch.randn(48, 32))
                self.head = nn.Linear(48, 4)
            def forward(self, x):
                return self.head(F.linear(x, self.w_in))
        def build_model():
            return M()
        def example_inputs():
            return (torch.randn(2, 32),)
        """,
}


# --- case set-ups: each gets the case directory (cwd of the command) ------------------------

def _adapter(wd: Path, name: str = "ad") -> Path:
    shutil.copytree(wd.parent.parent / "_adapter", wd / name)
    return wd / name


def _edit_weights(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def setup(wd: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = _adapter(wd) / "adapter_model.safetensors"
        state = load_file(str(path))
        fn(state)
        save_file(state, str(path))
    return setup


def _drop_b(state: dict[str, torch.Tensor]) -> None:
    del state["base_model.model.w_in.lora_B.weight"]


def _drop_head(state: dict[str, torch.Tensor]) -> None:
    for key in [k for k in state if ".head." in k]:
        del state[key]


def _inf(state: dict[str, torch.Tensor]) -> None:
    state["base_model.model.w_in.lora_B.weight"][0, 0] = float("inf")
    state["base_model.model.w_in.lora_A.weight"].normal_()


def _write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def setup(wd: Path) -> None:
        path = _adapter(wd) / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return setup


def _truncate(wd: Path) -> None:
    path = _adapter(wd) / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _config_only(wd: Path) -> None:
    (_adapter(wd) / "adapter_model.safetensors").unlink()


def _config(**changes: Any) -> Callable[[Path], None]:
    def setup(wd: Path) -> None:
        path = _adapter(wd) / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return setup


def _mount(path: Path, options: str) -> bool:
    path.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    if ok:
        MOUNTS.append(path)
    return ok


def _read_only(wd: Path) -> None:
    if not _mount(wd / "ro", "ro,size=64k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")



def _full_adapter(wd: Path) -> None:
    if not _mount(wd / "full", "size=64k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    shutil.copytree(wd.parent.parent / "_adapter", wd / "full" / "ad")
    fill_disk(wd / "full")


def _full_onnx(wd: Path) -> None:
    if not _mount(wd / "full", "size=64k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    (wd / "full" / "model.onnx").write_bytes(b"the previous export")
    fill_disk(wd / "full")


def _pickle_only(wd: Path) -> None:
    ad = _adapter(wd)
    (ad / "adapter_model.safetensors").rename(ad / "adapter_model.bin")


MOUNTS: list[Path] = []


@dataclass
class Case:
    id: str
    args: list[str]
    expect: list[str]                  # words the one-line message must hold
    setup: Callable[[Path], None] | None = None
    code: int = 1


EXPORT = ["export", "good.py", "--adapter", "ad", "-o", "out.onnx", "--no-verify"]
CASES = [
    # the model file
    Case("missing_file", ["inspect", "missing.py"], ["missing.py does not exist"]),
    Case("model_is_dir", ["inspect", "adir"], ["adir is a directory"],
         lambda wd: (wd / "adir").mkdir()),
    Case("broken_symlink", ["inspect", "link.py"], ["link.py does not exist", "symbolic link"],
         lambda wd: (wd / "link.py").symlink_to(wd / "gone.py")),
    Case("null_bytes", ["inspect", "bin.py"], ["bin.py is not a Python source file"],
         lambda wd: (wd / "bin.py").write_bytes(b"\xff\xfe\x00bad")),
    Case("not_utf8", ["inspect", "latin.py"], ["latin.py is not a Python source file"],
         lambda wd: (wd / "latin.py").write_bytes(b"x = 1\n\xff = 2\n")),
    Case("syntax_error", ["inspect", "syntax.py"], ["syntax.py:2: syntax error"]),
    Case("raises_on_import", ["inspect", "raises.py"],
         ["raises.py", "RuntimeError", "raises.py:2", "boom at import"]),
    Case("sys_exit", ["inspect", "sysexit.py"], ["sys.exit(0)", "__main__"]),
    Case("build_raises", ["inspect", "build_raises.py"],
         ["build_model() raised ValueError", "build_raises.py:3", "bad width"]),
    Case("no_model", ["inspect", "no_model.py"], ["has no model", "build_model()"]),
    Case("no_factory", ["inspect", "good.py:nofactory"], ["defines no 'nofactory'"]),
    Case("not_a_module", ["inspect", "returns_int.py"], ["returned int, not an nn.Module"]),
    Case("no_inputs", ["inspect", "no_inputs.py"], ["has no example_inputs"]),
    Case("inputs_str", ["inspect", "inputs_str.py"], ["must be a tuple of tensors, got str"]),
    Case("inputs_numpy", ["inspect", "inputs_numpy.py"], ["ndarray", "torch.from_numpy"]),
    Case("inputs_shape", ["inspect", "inputs_shape.py"],
         ["fails on its example inputs", "(2, 5)", "module '0'", "2x5 and 3x4"]),
    Case("inputs_raise", ["inspect", "inputs_raise.py"],
         ["example_inputs() raised RuntimeError", "inputs_raise.py:5"]),
    Case("uncapturable", ["inspect", "uncapturable.py"],
         ["cannot capture M", "aten.item", "uncapturable.py:9", ".item() > 0", "torch.where"]),
    Case("unknown_plugin", ["inspect", "nosuch:thing"], ["unknown MODEL plugin 'nosuch'"]),
    # the LoRA config
    Case("target_nothing", ["inject", "good.py", "-t", "w_inn", "-o", "new"],
         ["['w_inn'] matches no site", "closest: w_in", "lorafx inspect"]),
    Case("no_target", ["inject", "good.py", "-o", "new"], ["no target"]),
    Case("rank_zero", ["inject", "good.py", "-t", "w_in", "-r", "0", "-o", "new"],
         ["r=0 must be an integer >= 1"]),
    Case("alpha_zero", ["inject", "good.py", "-t", "w_in", "--alpha", "0", "-o", "new"],
         ["lora_alpha=0.0 must be a finite number > 0"]),
    Case("alpha_negative", ["inject", "good.py", "-t", "w_in", "--alpha=-2", "-o", "new"],
         ["lora_alpha=-2.0"]),
    Case("dropout_one", ["inject", "good.py", "-t", "w_in", "--dropout", "1", "-o", "new"],
         ["lora_dropout=1.0 must be in [0, 1)"]),
    Case("dropout_negative", ["inject", "good.py", "-t", "w_in", "--dropout=-0.1", "-o", "new"],
         ["lora_dropout=-0.1"]),
    Case("init_unknown", ["inject", "good.py", "-t", "w_in", "--init", "pissa2", "-o", "new"],
         ["init_lora_weights='pissa2' is not supported"]),
    Case("rank_pattern_zero", ["inject", "good.py", "-t", "w_in", "--rank-pattern", "w_in=0",
                               "-o", "new"], ["rank_pattern['w_in']=0"]),
    Case("regex_invalid", ["inject", "good.py", "--target-regex", "(", "-o", "new"],
         ["regex '(' is invalid"]),
    Case("rank_not_int", ["inject", "good.py", "-t", "w_in", "-r", "abc", "-o", "new"],
         ["'abc' is not a valid integer"], code=2),
    # the adapter
    Case("adapter_other_names", ["export", "other.py", "--adapter", "ad", "-o", "out.onnx"],
         ["w_in"], _adapter),
    Case("adapter_other_shapes", ["export", "other_shape.py", "--adapter", "ad", "-o",
                                  "out.onnx"], ["w_in.lora_B", "(64, 4)", "(48, 4)",
                                                "another model"], _adapter),
    Case("adapter_missing", EXPORT, ["adapter directory ad does not exist"]),
    Case("adapter_empty", EXPORT, ["adapter_config.json is missing"],
         lambda wd: (wd / "ad").mkdir()),
    Case("adapter_no_weights", EXPORT, ["adapter_model.safetensors is missing"], _config_only),
    Case("adapter_half_pair", EXPORT, ["'w_in' has only one of lora_A / lora_B"],
         _edit_weights(_drop_b)),
    Case("adapter_site_missing", EXPORT, ["'head' has no weights in the adapter"],
         _edit_weights(_drop_head)),
    Case("safetensors_truncated", EXPORT, ["not a readable safetensors file"], _truncate),
    Case("safetensors_garbage", EXPORT, ["not a readable safetensors file"],
         _write("adapter_model.safetensors", os.urandom(64))),
    Case("safetensors_empty", EXPORT, ["not a readable safetensors file"],
         _write("adapter_model.safetensors", b"")),
    Case("config_not_json", EXPORT, ["adapter_config.json is not valid JSON"],
         _write("adapter_config.json", "{r: 4,")),
    Case("config_array", EXPORT, ["must hold a JSON object"],
         _write("adapter_config.json", "[1, 2]")),
    Case("config_r_string", EXPORT, ["adapter_config.json", "r='4' (str) must be an integer"],
         _config(r="4")),
    Case("config_alpha_negative", EXPORT, ["lora_alpha=-8"], _config(lora_alpha=-8)),
    Case("config_bias_all", EXPORT, ["bias='all' is not supported"], _config(bias="all")),
    Case("config_not_lora", EXPORT, ["peft_type='IA3' is not LORA"], _config(peft_type="IA3")),
    Case("config_variant", EXPORT, ["use_qalora=True", "variant"], _config(use_qalora=True)),
    Case("config_targets_type", EXPORT, ["target_modules=5"], _config(target_modules=5)),
    Case("pickle_adapter", EXPORT, ["adapter_model.bin is a pickle", "safetensors"],
         _pickle_only),
    Case("merge_non_finite", ["export", "good.py", "--adapter", "ad", "-o", "out.onnx"],
         ["site 'w_in'", "non-finite"], _edit_weights(_inf)),
    # where the output goes
    Case("adapter_exists", ["inject", "good.py", *ADAPTER, "-o", "ad"],
         ["ad already holds an adapter", "--force"], _adapter),
    Case("out_dir_uncreatable", ["inject", "good.py", *ADAPTER, "-o", "good.py/sub/ad"],
         ["good.py/sub cannot be created", "good.py is a file"]),
    Case("out_under_file", ["inject", "good.py", *ADAPTER, "-o", "good.py/ad"],
         ["good.py is a file"]),
    Case("export_dir_uncreatable", ["export", "good.py", "-o", "ro/sub/m.onnx"],
         ["ro/sub cannot be created", "ro is not writable"], _read_only),
    Case("out_read_only", ["inject", "good.py", *ADAPTER, "-o", "ro/ad"],
         ["ro is not writable"], _read_only),
    Case("disk_full_adapter", ["inject", "good.py", *ADAPTER, "-o", "full/ad", "--force"],
         ["could not write", "No space left on device", "nothing was changed"], _full_adapter),
    Case("disk_full_onnx", ["export", "good.py", "-o", "full/model.onnx", "--no-verify",
                             "--force"],
         ["could not write", "No space left on device"], _full_onnx),
    Case("train_no_steps", ["train", "good.py", "--adapter", "ad", "--steps", "0"],
         ["--steps 0 must be >= 1"], _adapter),
]


def snapshot(root: Path) -> dict[str, Any]:
    """Every path under ``root`` with its kind, mode, size, mtime and content hash."""
    out: dict[str, Any] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = path.lstat()
            if path.is_symlink():
                out[str(path)] = ("link", os.readlink(path))
            elif path.is_dir():
                out[str(path)] = ("dir", st.st_mode)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[str(path)] = ("file", st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def _prepare(case: Case, root: Path) -> tuple[Path, list[str]]:
    wd = root / case.id
    wd.mkdir(parents=True)
    shutil.copy(TINY, wd / "good.py")
    for name, source in MODELS.items():
        (wd / name).write_text(textwrap.dedent(source).lstrip())
    if case.setup is not None:
        case.setup(wd)
    return wd, ["lorafx", *case.args]


# Each command runs as ``lora_fx.cli:main(argv)`` (what the ``lorafx`` script runs) in a child
# forked from one driver that imported torch once, with stdout/stderr redirected at the file
# descriptor level (so even raw prints from C or torch are caught): ~0.1 s of CPU a case instead
# of ~1.7 s for a fresh interpreter. REAL cases also run through the installed console script,
# and LORAFX_REAL_CLI=1 runs every case that way.
DRIVER = r"""
import json, os, sys, traceback
import torch, torch.onnx, lora_fx.api, lora_fx.load, lora_fx.onnx.export
import lora_fx.cli, lora_fx.cli.inspect, lora_fx.cli.inject, lora_fx.cli.export, lora_fx.cli.train
import lora_fx.cli.deploy, lora_fx.cli.analysis, lora_fx.cli.plan
jobs, running, codes = json.load(sys.stdin), {}, {}
def reap():
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
for i, job in enumerate(jobs):
    if len(running) >= 2:
        reap()
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid:
        running[pid] = i
        continue
    code = 98
    try:
        os.chdir(job["cwd"])
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        try:
            lora_fx.cli.main(job["argv"])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 99
        sys.stdout.flush(); sys.stderr.flush()
    finally:
        os._exit(code)
while running:
    reap()
print(json.dumps([codes[i] for i in range(len(jobs))]))
"""
REAL = ["missing_file", "uncapturable", "config_r_string", "pickle_adapter", "out_read_only",
        "disk_full_adapter"]


def _run_forked(jobs: list[tuple[Case, Path, list[str]]], logs: Path) -> list[Any]:
    specs = [{"cwd": str(wd), "argv": argv[1:], "out": str(logs / f"{case.id}.out"),
              "err": str(logs / f"{case.id}.err")} for case, wd, argv in jobs]
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(specs), text=True,
                          capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    codes = json.loads(proc.stdout.splitlines()[-1])
    return [subprocess.CompletedProcess(argv, code, Path(spec["out"]).read_text(),
                                        Path(spec["err"]).read_text())
            for (_, _, argv), spec, code in zip(jobs, specs, codes, strict=True)]


def _run_real(jobs: list[tuple[Case, Path, list[str]]]) -> list[Any]:
    def one(job: tuple[Case, Path, list[str]]) -> Any:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        return subprocess.run(job[2], cwd=job[1], capture_output=True, text=True, timeout=600,
                              env=env)
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(one, jobs))


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Prepare every case twice (forked and real), run all commands, unmount the tmpfs."""
    import lora_fx
    from lora_fx.load.model import load_model

    root = tmp_path_factory.mktemp("errors")
    tiny = load_model(str(TINY))
    gm = lora_fx.inject(tiny.module, tiny.example_inputs,
                        lora_fx.LoraConfig(r=4, target_modules=["w_in", "head"]))
    lora_fx.save_adapter(gm, root / "_adapter")
    (root / "_logs").mkdir()
    all_real = os.environ.get("LORAFX_REAL_CLI") == "1"
    results: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        for mode in ("fork", "real"):
            jobs = []
            for case in CASES:
                if mode == "real" and not all_real and case.id not in REAL:
                    continue
                try:
                    jobs.append((case, *_prepare(case, root / mode)))
                except pytest.skip.Exception as skip:
                    results[mode, case.id] = {"skip": str(skip)}
            before = [snapshot(wd) for _, wd, _ in jobs]
            forked = mode == "fork" and hasattr(os, "fork")  # no fork (Windows): real runs
            procs = _run_forked(jobs, root / "_logs") if forked else _run_real(jobs)
            for (case, wd, _), snap, proc in zip(jobs, before, procs, strict=True):
                results[mode, case.id] = {"proc": proc, "before": snap, "after": snapshot(wd)}
        yield results
    finally:
        for path in reversed(MOUNTS):
            subprocess.run(["umount", str(path)], capture_output=True)


PARAMS = [("fork", c.id) for c in CASES] + [("real", c.id) for c in CASES
                                            if c.id in REAL or os.environ.get("LORAFX_REAL_CLI")]


@pytest.mark.parametrize(("mode", "case_id"), PARAMS)
def test_bad_input(table: dict[tuple[str, str], dict[str, Any]], mode: str, case_id: str) -> None:
    case = next(c for c in CASES if c.id == case_id)
    result = table[mode, case_id]
    if "skip" in result:
        pytest.skip(result["skip"])
    proc = result["proc"]
    lines = proc.stderr.splitlines()
    assert proc.returncode == case.code, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for word in case.expect:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert result["after"] == result["before"], "the command changed its directory"


def test_debug_shows_traceback(tmp_path: Path) -> None:
    """``--debug`` shows the traceback, then still the one ``error:`` line last."""
    proc = subprocess.run(["lorafx", "--debug", "inspect", str(tmp_path / "missing.py")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "LoraFxError" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: model file")
