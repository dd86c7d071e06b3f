"""Planning at the LoRA paper's scale on the meta device: exact counts, seconds, little memory.

The counts are the paper's (Hu et al., 2021, tables 2-4): GPT-3 175B with r=1 on W_q and W_v
trains 4.7M parameters, r=8 37.7M; RoBERTa-base r=8 0.3M, RoBERTa-large 0.8M. Each comes from
``lorafx inject ... --dry-run --json`` run in its own process, which also reports its peak RSS
and CPU time (the 175B model's fp32 weights would be 700 GB: they are never allocated).

Also here: the plan equals a real injection's counts for every branch kind, and ``lorafx plan``.
The pieces of the big-model export are in tests/onnx/test_big_export.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import lora_fx
from lora_fx import api
from lora_fx.cli.plan import plan_command
from lora_fx.config import LoraConfig
from lora_fx.load.meta import meta_device
from lora_fx.model.plan import adapter_bytes, plan_model
from tests.helpers import GPT3, gpt3_small

MODEL = str(GPT3)

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



@pytest.mark.parametrize("cfg", [
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    LoraConfig(r=2, target_modules=r".*\.(fc_in|out_proj)", rank_pattern={"fc_in": 5}),
    LoraConfig(r=3, target_modules=["k_proj"], modules_to_save=["ln_f"]),
])
def test_plan_equals_inject_counts(cfg: LoraConfig) -> None:
    """plan_model (shapes only) == count_parameters of a real injection, on real weights."""
    ids = torch.randint(0, 97, (2, 8))
    want = api.count_parameters(lora_fx.inject(gpt3_small(), (ids,), cfg))
    report = plan_model(gpt3_small(), (ids,), cfg)
    assert (report.trainable_params, report.total_params) == want
    with meta_device():
        meta_model, meta_ids = gpt3_small(), torch.zeros(2, 8, dtype=torch.long)
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
    report = plan_model(gpt3_small(), (ids,), cfg)
    head = next(s for s in report.sites if s.name == "wte@linear")
    assert (head.form, head.in_features, head.out_features, head.params) == \
        ("F.linear", 64, 97, 2 * (64 + 97))
    assert report.trainable_params == 2 * 2 * (64 + 64) + head.params
    assert (report.trainable_params, report.total_params) == \
        api.count_parameters(lora_fx.inject(gpt3_small(), (ids,), cfg))



def test_plan_command_reports_adapter_size() -> None:
    """``lorafx plan`` (lora_fx.cli.plan): GPT-3 r=4 on W_q, W_v, straight from --json."""
    result = CliRunner().invoke(plan_command, [f"{MODEL}:gpt3_175b", "-t", "q_proj", "-t", "v_proj",
                                       "-r", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["trainable_params"] == 4 * 4_718_592
    assert data["adapter_bytes_fp16"] == 37_748_736  # paper: ~35 MB
    assert data["capture"] == "symbolic_trace" and len(data["sites"]) == 192
    assert data["peak_rss_bytes"] > 0 and data["load_s"] >= 0 and data["plan_s"] >= 0

