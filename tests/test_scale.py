"""Planning at the LoRA paper's scale on the meta device: exact counts, seconds, little memory.

The counts are the paper's (Hu et al., 2021, tables 2-4): GPT-3 175B with r=1 on W_q and W_v
trains 4.7M parameters, r=8 37.7M; RoBERTa-base r=8 0.3M, RoBERTa-large 0.8M. Each comes from
``lorafx inject ... --dry-run --json`` run in its own process, which also reports its peak RSS
and CPU time (the 175B model's fp32 weights would be 700 GB: they are never allocated).

Also here: the plan equals a real injection's counts for every branch kind, and the pieces of
the big-model export (in-place merge, external data, verification after the weights are freed)
on a small model; the 2 GB run itself is ``benchmarks/bench_big_export.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, randomize_lora, token_ids

import lora_fx
from lora_fx import api
from lora_fx.config import LoraConfig
from lora_fx.load.meta import meta_device
from lora_fx.model.plan import adapter_bytes, plan_model

MODEL = str(ROOT / "examples" / "gpt3_175b" / "model.py")

# Runs the CLI in this process, then writes its peak RSS, CPU seconds and whether torch._dynamo
# was imported to stderr as the last line (stdout stays the CLI's JSON).
_WRAPPER = """
import json, resource, sys
argv = sys.argv[1:]
try:
    from lora_fx.cli.main import main
    main(argv)
finally:
    u = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"peak_rss_bytes": u.ru_maxrss * 1024, "cpu_s": u.ru_utime + u.ru_stime,
                      "dynamo": "torch._dynamo" in sys.modules}), file=sys.stderr)
"""

RUNS = {
    "gpt3_r1": [f"{MODEL}:gpt3_175b", "-t", "q_proj", "-t", "v_proj", "-r", "1"],
    "gpt3_r8": [f"{MODEL}:gpt3_175b", "-t", "q_proj", "-t", "v_proj", "-r", "8"],
    "roberta_base": [f"{MODEL}:roberta_base", "-t", "query", "-t", "value", "-r", "8"],
    "roberta_large": [f"{MODEL}:roberta_large", "-t", "query", "-t", "value", "-r", "8"],
}


@pytest.fixture(scope="module")
def dry_runs() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Every run of RUNS at once (one process each): {name: (cli json, measured)}."""
    procs = {name: subprocess.Popen(
        [sys.executable, "-c", _WRAPPER, "inject", *args, "--dry-run", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name, args in RUNS.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {stderr}"
        out[name] = (json.loads(stdout), json.loads(stderr.strip().splitlines()[-1]))
    return out


@pytest.mark.parametrize("name, sites, trainable", [
    ("gpt3_r1", 192, 4_718_592),         # paper: 4.7M
    ("gpt3_r8", 192, 37_748_736),        # paper: 37.7M
    ("roberta_base", 24, 294_912),       # paper: 0.3M
    ("roberta_large", 48, 786_432),      # paper: 0.8M
])
def test_paper_counts_from_cli_json(dry_runs: Any, name: str, sites: int,
                                    trainable: int) -> None:
    data, measured = dry_runs[name]
    assert data["trainable_params"] == trainable
    assert len(data["sites"]) == sites
    assert data["output"] is None
    print(f"{name}: {trainable:,} trainable / {data['total_params']:,}, "
          f"peak RSS {measured['peak_rss_bytes'] / 2**30:.2f} GiB, CPU {measured['cpu_s']:.1f} s")


def test_gpt3_plan_is_cheap(dry_runs: Any) -> None:
    """175B on the meta device: under 2 GiB, well under a minute of CPU, no torch._dynamo."""
    data, measured = dry_runs["gpt3_r1"]
    assert data["total_params"] - data["trainable_params"] == 174_604_259_328
    assert measured["peak_rss_bytes"] < 2 * 2**30
    assert measured["cpu_s"] < 60
    assert not measured["dynamo"]  # meta initializers skipped: the import alone costs seconds
    q = next(s for s in data["sites"] if s["name"] == "blocks.95.attn.q_proj")
    assert (q["in_features"], q["out_features"], q["r"]) == (12288, 12288, 1)


def test_adapter_size_fp16_gpt3_r4(dry_runs: Any) -> None:
    """Paper: ~35 MB for r=4 on W_q, W_v instead of 350 GB; counts are linear in r."""
    data, _ = dry_runs["gpt3_r1"]
    size = adapter_bytes(4 * data["trainable_params"], torch.float16)
    assert size == 37_748_736  # 36.0 MiB
    assert abs(size / 2**20 - 35) < 2
    base_fp16 = adapter_bytes(data["total_params"] - data["trainable_params"], torch.float16)
    assert 345e9 < base_fp16 < 355e9  # "350 GB"
    assert base_fp16 / size > 9000


def _small() -> torch.nn.Module:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpt3_model", MODEL)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.gpt3_small()  # type: ignore[no-any-return]


@pytest.mark.parametrize("cfg", [
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    LoraConfig(r=2, target_modules=r".*\.(fc_in|out_proj)", rank_pattern={"fc_in": 5}),
    LoraConfig(r=3, target_modules=["k_proj"], modules_to_save=["ln_f"]),
])
def test_plan_equals_inject_counts(cfg: LoraConfig) -> None:
    """plan_model (shapes only) == count_parameters of a real injection, on real weights."""
    ids = torch.randint(0, 97, (2, 8))
    want = api.count_parameters(lora_fx.inject(_small(), (ids,), cfg))
    report = plan_model(_small(), (ids,), cfg)
    assert (report.trainable_params, report.total_params) == want
    with meta_device():
        meta_model, meta_ids = _small(), torch.zeros(2, 8, dtype=torch.long)
    assert next(meta_model.parameters()).is_meta
    meta = plan_model(meta_model, (meta_ids,), cfg)
    assert (meta.trainable_params, meta.total_params) == want
    assert [s.name for s in meta.sites] == [s.name for s in report.sites]


class _Mixed(torch.nn.Module):
    """A conv, a linear called twice (one site, one branch) and an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.proj = torch.nn.Linear(8, 8)
        self.emb = torch.nn.Embedding(10, 8)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean((2, 3))
        return self.proj(self.proj(h)) + self.emb(ids).mean(1)


@pytest.mark.parametrize("cfg", [
    LoraConfig(r=2, target_modules=["conv", "proj", "emb"]),
    LoraConfig(r=3, target_modules=["proj"], use_dora=True),
])
def test_plan_counts_conv_embedding_dora_and_reuse(cfg: LoraConfig) -> None:
    """Branch shapes beyond r·(in+out) are counted exactly: conv A is (r, in, kh, kw), DoRA adds
    a magnitude per output, a module called twice has one branch."""
    torch.manual_seed(0)
    inputs = (torch.randn(2, 3, 6, 6), torch.randint(0, 10, (2, 4)))
    want = api.count_parameters(lora_fx.inject(_Mixed(), inputs, cfg))
    report = plan_model(_Mixed(), inputs, cfg)
    assert (report.trainable_params, report.total_params) == want
    assert len({s.name for s in report.sites}) == len(report.sites)


def test_meta_device_skips_initializers_only_on_meta() -> None:
    with meta_device():
        emb = torch.nn.Embedding(10, 4)
        real = torch.nn.init.normal_(torch.zeros(3, device="cpu"))
    assert emb.weight.is_meta
    assert not real.is_meta and real.abs().sum() > 0  # CPU tensors are still initialized


def test_plan_covers_the_functional_tied_head() -> None:
    """The head ``F.linear(h, wte.weight)`` has no module for PEFT to wrap; the graph makes it a
    site of its own (``wte@linear``), planned and counted like any other."""
    ids = torch.randint(0, 97, (2, 8))
    cfg = LoraConfig(r=2, target_modules=["wte@linear", "q_proj"])
    report = plan_model(_small(), (ids,), cfg)
    head = next(s for s in report.sites if s.name == "wte@linear")
    assert (head.form, head.in_features, head.out_features, head.params) == \
        ("F.linear", 64, 97, 2 * (64 + 97))
    assert report.trainable_params == 2 * 2 * (64 + 64) + head.params
    assert (report.trainable_params, report.total_params) == \
        api.count_parameters(lora_fx.inject(_small(), (ids,), cfg))


def _injected_small(seed: int = 3) -> tuple[torch.nn.Module, Any, torch.Tensor]:
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(seed))
    base = _small()
    gm = lora_fx.inject(base, (ids,), LoraConfig(r=4, lora_alpha=8,
                                                target_modules=["q_proj", "v_proj", "fc_in"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(gm):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return base, gm, ids


def test_inplace_merge_folds_into_the_same_storage() -> None:
    """merge(inplace=True): W' = W + s·B@A written into W's own tensor, equal to the copy merge
    and to a hand merge; the injected model then refuses to run (it would add Δ twice)."""
    base, gm, ids = _injected_small()
    copy_merged = lora_fx.merge(gm)
    with torch.no_grad():
        want = copy_merged(ids)
    q = base.blocks[1].attn.q_proj.weight
    branch = lora_fx.branches(gm)["blocks.1.attn.q_proj"]
    hand = q.detach().double() + branch.scaling * (branch.lora_B.weight.double()
                                                   @ branch.lora_A.weight.double())
    ptr, wte = q.data_ptr(), base.wte.weight.detach().clone()
    merged = lora_fx.merge(gm, inplace=True)
    assert merged.get_parameter("blocks.1.attn.q_proj.weight") is q and q.data_ptr() == ptr
    torch.testing.assert_close(q.detach().double(), hand, atol=1e-6, rtol=0)
    assert torch.equal(base.wte.weight, wte)  # not a site: untouched
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), want, atol=1e-5, rtol=0)
    with pytest.raises(lora_fx.LoraFxError, match="merged in place"):
        gm(ids)


def test_external_data_export_verified_after_release(tmp_path: Any, monkeypatch: Any) -> None:
    """The big-model path on a small model: external data forced, ONNX Runtime verifies the file
    against outputs computed before the model was released; the op histogram comes from the
    exporter's IR (no serialization of the weights) and equals the saved file's."""
    import gc
    import weakref

    import onnx

    from lora_fx.api import export_onnx
    from lora_fx.onnx import names
    from lora_fx.onnx.report import op_histogram
    from lora_fx.onnx.verify import forward, verify_file

    monkeypatch.setattr(names, "EXTERNAL_DATA_BYTES", 0)
    base, gm, ids = _injected_small()
    merged = lora_fx.merge(gm, inplace=True)
    path = tmp_path / "model.onnx"
    report = export_onnx(merged, (ids,), path, verify=False)
    data = [f for f in tmp_path.iterdir() if f.name.endswith(".data")]
    assert report.external_data and len(data) == 1 and data[0].stat().st_size > 0
    assert data[0].name.startswith("model.onnx.")  # model.onnx.<8 hex>.data
    want = forward(merged, (ids,))
    alive = weakref.ref(base.blocks[0].attn.q_proj.weight)
    del base, gm, merged
    gc.collect()
    assert alive() is None  # no PyTorch copy of the weights is left while ONNX Runtime runs
    verify_file(report, (ids,), want)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    saved = onnx.load(str(path), load_external_data=False)
    assert report.op_histogram == dict(op_histogram(saved))


def test_export_release_frees_weights_then_verifies(tmp_path: Any, monkeypatch: Any) -> None:
    """export_onnx(release=True): verified in ONNX Runtime after the model's weights were freed;
    the file also matches an independent copy-merge computed before the in-place fold."""
    from lora_fx.onnx import export as onnx_export
    from lora_fx.onnx import names
    from lora_fx.ort import runtime

    monkeypatch.setattr(names, "EXTERNAL_DATA_BYTES", 0)
    base, gm, ids = _injected_small(seed=5)
    with torch.no_grad():
        want = lora_fx.merge(gm)(ids)
    merged = lora_fx.merge(gm, inplace=True)
    report = onnx_export.export_onnx(merged, (ids,), tmp_path / "m.onnx", release=True)
    assert report.external_data and report.max_abs_diff is not None
    assert report.max_abs_diff <= 1e-4
    assert base.blocks[0].attn.q_proj.weight.numel() == 0  # freed: the model is consumed
    got = runtime.run(runtime.open_session(tmp_path / "m.onnx"), (ids,))
    assert runtime.max_abs_diff(got, [want]) <= 1e-4


def test_plan_command_reports_adapter_size() -> None:
    """``lorafx plan`` (lora_fx.cli.plan): GPT-3 r=4 on W_q, W_v, straight from --json."""
    from click.testing import CliRunner

    from lora_fx.cli.plan import plan_command as plan

    result = CliRunner().invoke(plan, [f"{MODEL}:gpt3_175b", "-t", "q_proj", "-t", "v_proj",
                                       "-r", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["trainable_params"] == 4 * 4_718_592
    assert data["adapter_bytes_fp16"] == 37_748_736  # paper: ~35 MB
    assert data["capture"] == "symbolic_trace" and len(data["sites"]) == 192
    assert data["peak_rss_bytes"] > 0 and data["load_s"] >= 0 and data["plan_s"] >= 0


def test_external_data_replace_keeps_a_consistent_pair(tmp_path: Any, monkeypatch: Any) -> None:
    """Exporting over a model with external data: each export writes its own data file, so the
    previous model keeps its data until the new model is in place; then the old data file goes.
    Killed between the two renames (simulated), the previous model still loads and runs."""
    import numpy as np
    import onnxruntime as ort

    from lora_fx.onnx import export as onnx_export
    from lora_fx.onnx import names, save

    monkeypatch.setattr(names, "EXTERNAL_DATA_BYTES", 0)
    base, gm, ids = _injected_small(seed=7)
    path = tmp_path / "model.onnx"
    onnx_export.export_onnx(base, (ids,), path, verify=False)
    first = {f.name for f in tmp_path.iterdir()}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: ids.numpy()}
    before = sess.run(None, feed)[0]
    del sess

    real_replace = os.replace
    calls: list[str] = []

    def dies_before_model(src: Any, dst: Any) -> None:
        calls.append(Path(dst).name)
        if Path(dst).name == "model.onnx":
            raise KeyboardInterrupt  # the process is killed between the two renames
        real_replace(src, dst)

    monkeypatch.setattr(save.os, "replace", dies_before_model)
    merged = lora_fx.merge(gm)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(merged, (ids,), path, verify=False)
    monkeypatch.setattr(save.os, "replace", real_replace)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, feed)[0], before)  # old model, old data
    del sess

    orphan = next(n for n in calls if n.endswith(".data"))  # the killed export's data
    assert (tmp_path / orphan).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    killed = tmp_path / f"model.onnx.{dead}.0123abcd.data"  # an export killed in another process
    killed.write_bytes(b"partial")
    report = onnx_export.export_onnx(merged, (ids,), path)  # a clean export replaces it
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    old_data = {n for n in first if n.endswith(".data")}
    left = {f.name for f in tmp_path.iterdir() if f.name.endswith(".data")}
    assert not old_data & left  # the replaced model's data file was deleted
    assert not killed.exists()  # a dead process's unreferenced data file was swept
    assert orphan in left  # this (live) process's own: not a dead export's, kept


def test_lean_session_holds_weights_once(tmp_path: Any) -> None:
    """The verification session of release=True: no weight prepacking, no memory arena; the
    same outputs as a default session."""
    import numpy as np

    from lora_fx.onnx import export as onnx_export
    from lora_fx.ort import runtime

    _, gm, ids = _injected_small(seed=9)
    path = tmp_path / "m.onnx"
    onnx_export.export_onnx(gm, (ids,), path, verify=False)
    lean = runtime.open_session(path, ["CPUExecutionProvider"], lean=True)
    opts = lean.get_session_options()
    assert opts.get_session_config_entry("session.disable_prepacking") == "1"
    assert not opts.enable_cpu_mem_arena
    default = runtime.open_session(path, ["CPUExecutionProvider"])
    np.testing.assert_array_equal(runtime.run(lean, (ids,))[0], runtime.run(default, (ids,))[0])


def _optimized_initializer_shapes(path: Path, lean: bool, tmp: Path) -> tuple[set[tuple[int, ...]],
                                                                           list[Any]]:
    """(initializer shapes, FusedMatMul nodes) of the graph ONNX Runtime runs for ``path``
    under open_session's options (saved through ``optimized_model_filepath``)."""
    import onnx
    import onnxruntime as ort

    from lora_fx.ort import runtime

    opts, disabled = runtime.session_options(lean=lean)
    out = tmp / f"optimized_{lean}.onnx"
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                         disabled_optimizers=disabled)
    model = onnx.load(str(out))
    return ({tuple(t.dims) for t in model.graph.initializer},
            [n for n in model.graph.node if n.op_type == "FusedMatMul"])


def test_lean_session_reads_a_tied_head_without_a_transposed_copy(tmp_path: Path) -> None:
    """A tied LM head is MatMul(x, Transpose(wte)) in the file. A default session folds the
    transpose into a second [d, vocab] weight; the lean one (verification of big exports)
    runs FusedMatMul(x, wte, transB=1) on the one stored weight, with the same outputs."""
    import numpy as np
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_fx.onnx import export as onnx_export
    from lora_fx.ort import runtime

    torch.manual_seed(0)  # vocab · d > 8192: onnxscript leaves the transpose to the runtime
    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=300,
                                      n_positions=32, use_cache=False)).eval()
    ids = token_ids()
    gm = lora_fx.inject(base, (ids,), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    randomize_lora(gm, seed=2)
    path = tmp_path / "m.onnx"
    onnx_export.export_onnx(gm, (ids,), path, verify=False)
    vocab, d = base.config.vocab_size, base.config.n_embd
    shapes, _ = _optimized_initializer_shapes(path, False, tmp_path)
    assert (d, vocab) in shapes  # the folded transposed copy
    shapes, fused = _optimized_initializer_shapes(path, True, tmp_path)
    assert (d, vocab) not in shapes and (vocab, d) in shapes
    assert any(a.name == "transB" and a.i == 1 for n in fused for a in n.attribute)
    lean = runtime.open_session(path, ["CPUExecutionProvider"], lean=True)
    default = runtime.open_session(path, ["CPUExecutionProvider"])
    np.testing.assert_allclose(runtime.run(lean, (ids,))[0], runtime.run(default, (ids,))[0],
                               atol=1e-5, rtol=1e-5)


TRIM_CHILD = """
import torch
from lora_fx import memory
def anon():
    f = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
    return int(f["RssAnon"].split()[0]) * 1024
big = torch.ones(16 << 20, dtype=torch.uint8); del big  # glibc's mmap threshold rises to 16 MB
blocks = [torch.ones(8 << 20, dtype=torch.uint8) for _ in range(10)]  # so these come from the heap
pin = torch.ones(4 << 20, dtype=torch.uint8)  # above them: the heap's top stays in use
del blocks  # 80 MB free inside the heap, still resident
before = anon()
print(int(memory.trim()), before - anon())
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_trim_returns_freed_heap_memory() -> None:
    """memory.trim (run after an in-place merge and around a big export): freed tensors that
    glibc kept in its heap stop being resident."""
    out = subprocess.run([sys.executable, "-c", TRIM_CHILD], capture_output=True, text=True,
                         check=True).stdout.split()
    if out[0] == "0":
        pytest.skip("this C library has no malloc_trim")
    assert int(out[1]) > 60 << 20  # of the 80 MB freed


def test_export_release_merges_in_place(tmp_path: Any, monkeypatch: Any) -> None:
    """export_onnx(gm, release=True) (what `lorafx export` runs) folds W' into the user's own
    weight tensors (no second copy) before freeing them: W' = W + s·B@A by hand, same storage."""
    from lora_fx.onnx import export as onnx_export

    monkeypatch.setattr(onnx_export, "release_weights", lambda *modules: None)  # look after
    base, gm, ids = _injected_small(seed=11)
    weight = base.blocks[0].attn.q_proj.weight
    ptr, w0 = weight.data_ptr(), weight.detach().clone()
    branch = lora_fx.branches(gm)["blocks.0.attn.q_proj"]
    delta = branch.scaling * branch.lora_B.weight.detach() @ branch.lora_A.weight.detach()
    report = onnx_export.export_onnx(gm, (ids,), tmp_path / "m.onnx", release=True)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert weight.data_ptr() == ptr
    torch.testing.assert_close(weight.detach(), w0 + delta, atol=1e-6, rtol=1e-6)
