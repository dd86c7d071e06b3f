"""``lorafx export --kv-cache`` and ``lorafx generate`` from the command line; bad input gets one
line and a non-zero exit; a decoder built from its default config (``use_cache=True``)
captures and exports without the user editing its config."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_fx.cli.main import main
from lora_fx.ort.adapters import write_ort_adapter
from tests.helpers import run_cli, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

POSITIONS, VOCAB = 64, 300
ENGINES = ["onnxruntime", "onnxruntime_genai"]


def save_gpt2_with_tokenizer(directory: Path) -> torch.nn.Module:
    """A tiny GPT-2 (64 positions) and a byte-level BPE tokenizer trained on one line, saved
    together as a Hugging Face model directory."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 10,
                            vocab_size=VOCAB, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = transformers.GPT2TokenizerFast(tokenizer_object=bpe._tokenizer,
                                         eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB,
                                     n_positions=POSITIONS, initializer_range=0.2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("generate")
    model = save_gpt2_with_tokenizer(tmp / "hf")
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    pm.save_pretrained(str(tmp / "chat"))
    out = tmp / "kv" / "model.onnx"
    proc = run_cli("export", f"hf:{tmp / 'hf'}", "--adapter", str(tmp / "chat"), "--no-merge",
                   "--kv-cache", "-o", str(out), "--json")
    return {"tmp": tmp, "dir": out.parent, "report": json.loads(proc.stdout)}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``lorafx ARGS`` in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        main(list(args))
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_writes_a_folder_genai_loads(folder: dict[str, Any]) -> None:
    report, d = folder["report"], folder["dir"]
    assert report["kind"] == "unmerged" and report["kv_cache"] is True
    assert report["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert report["inputs"][3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert report["outputs"][:3] == ["logits", "present.0.key", "present.0.value"]
    assert set(report["tokenizer_files"]) >= {"tokenizer.json", "tokenizer_config.json"}
    assert Path(report["adapter_file"]) == d / "chat.onnx_adapter"
    assert all(v <= 1e-4 for v in report["max_abs_diff"].values())
    config = json.loads((d / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is False
    assert config["model"]["context_length"] == POSITIONS
    og = pytest.importorskip("onnxruntime_genai")
    og.Model(str(d))


@pytest.mark.parametrize("engine", ENGINES)
def test_generate_prints_tokens_and_speed(folder: dict[str, Any], engine: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    if engine == "onnxruntime_genai":
        pytest.importorskip("onnxruntime_genai")
    d = str(folder["dir"])
    runs = {}
    for adapter in ([], ["--adapter", str(folder["dir"] / "chat.onnx_adapter")]):
        code, out, err = cli(capsys, "generate", d, "--prompt-ids", "5,6,7", "--prompt-ids",
                             "8,9,10", "--max-new-tokens", "6", "--engine", engine, "--json",
                             *adapter)
        assert code == 0, err
        data = json.loads(out)
        assert data["engine"] == engine and data["provider"] == "CPUExecutionProvider"
        assert len(data["tokens"]) == 2 and data["decode_tokens_per_s"] > 0
        runs[bool(adapter)] = data["tokens"]
    assert runs[True] != runs[False]  # the exported adapter is off by default, on when asked
    code, out, _ = cli(capsys, "generate", d, "--prompt", "hello world", "--max-new-tokens",
                       "3", "--engine", engine)
    assert code == 0 and "tokens/s" in out and f"{engine} on CPUExecutionProvider" in out


def test_engines_agree_and_sampling_is_seeded(folder: dict[str, Any],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime_genai")
    d, adapter = str(folder["dir"]), str(folder["dir"] / "chat.onnx_adapter")
    tokens = []
    for engine in ENGINES:
        _, out, _ = cli(capsys, "generate", d, "--prompt-ids", "11,12,13,14", "--adapter",
                        adapter, "--max-new-tokens", "8", "--engine", engine, "--json")
        tokens.append(json.loads(out)["tokens"])
    assert tokens[0] == tokens[1]
    sampled = []
    for _ in range(2):
        _, out, _ = cli(capsys, "generate", d, "--prompt-ids", "11,12,13", "--do-sample",
                        "--top-k", "20", "--temperature", "1.5", "--seed", "7",
                        "--engine", "onnxruntime", "--json")
        sampled.append(json.loads(out)["tokens"])
    assert sampled[0] == sampled[1]


def _foreign_adapter(tmp: Path) -> Path:
    """An adapter file of another model's sites (a LLaMA's q_proj)."""
    path = tmp / "llama.onnx_adapter"
    if not path.exists():
        write_ort_adapter({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(32, 2),
                           "model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(2, 32)},
                          path)
    return path


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case, needle", [
    ("vocab", "outside the vocabulary [0, 300)"),
    ("no-config", "has no genai_config.json"),
    ("foreign-adapter", "is not an adapter input"),
    ("too-long", "longer than the model's 64 positions"),
    ("too-long-with-new", "longer than the model's 64 positions"),
    ("not-ids", "comma-separated integers"),
    ("both-prompts", "one of the two"),
])
def test_generate_refuses_bad_input(folder: dict[str, Any], engine: str, case: str,
                                    needle: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    if engine == "onnxruntime_genai":
        pytest.importorskip("onnxruntime_genai")
    d = str(folder["dir"])
    args = {"vocab": [d, "--prompt-ids", "1,2,300"],
            "no-config": [str(tmp_path), "--prompt-ids", "1,2"],
            "foreign-adapter": [d, "--prompt-ids", "1,2", "--adapter",
                                str(_foreign_adapter(folder["tmp"]))],
            "too-long": [d, "--prompt-ids", ",".join(["5"] * (POSITIONS + 1))],
            "too-long-with-new": [d, "--prompt-ids", ",".join(["5"] * 60),
                                  "--max-new-tokens", "5"],
            "not-ids": [d, "--prompt-ids", "1,two"],
            "both-prompts": [d, "--prompt-ids", "1", "--prompt", "hi"]}[case]
    code, out, err = cli(capsys, "generate", *args, "--engine", engine)
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


NOT_DECODERS = {
    "mlp": "import torch\nmodel = torch.nn.Sequential(torch.nn.Linear(8, 8))\n"
           "example_inputs = (torch.randn(2, 8),)\n",
    "bert": "import torch\nfrom transformers import BertConfig, BertModel\n"
            "def build_model():\n"
            "    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=1,\n"
            "        num_attention_heads=4, intermediate_size=64, vocab_size=50)).eval()\n"
            "def example_inputs():\n    return (torch.randint(0, 50, (2, 8)),)\n",
}


@pytest.mark.parametrize("kind", sorted(NOT_DECODERS))
def test_kv_cache_refuses_a_model_that_is_not_a_decoder(kind: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    model = tmp_path / "model.py"
    model.write_text(NOT_DECODERS[kind])
    code, out, err = cli(capsys, "export", str(model), "--kv-cache", "-o",
                         str(tmp_path / "kv" / "model.onnx"))
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: --kv-cache"), err
    assert "without --kv-cache" in err
    assert not (tmp_path / "kv").exists()


def test_decoder_with_its_default_config_captures_and_exports(tmp_path: Path) -> None:
    """use_cache=True (the default) used to fail capture ("Found DynamicCache in output")."""
    import lora_fx
    from lora_fx.load.model import load_model

    model_file = tmp_path / "model.py"
    model_file.write_text(
        "import torch\nfrom transformers import LlamaConfig, LlamaForCausalLM\n"
        "def build_model():\n    torch.manual_seed(0)\n"
        "    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,\n"
        "        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,\n"
        "        vocab_size=100)).eval()\n"
        "def example_inputs():\n    return (torch.randint(0, 100, (2, 8)),)\n")
    loaded = load_model(str(model_file))
    assert loaded.module.config.use_cache is True
    gm = lora_fx.inject(loaded.module, loaded.example_inputs,
                        lora_fx.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for branch in lora_fx.branches(gm).values():
            branch.lora_B.weight.copy_(torch.randn(branch.lora_B.weight.shape, generator=g))
    assert loaded.module.config.use_cache is True  # restored after the capture
    with torch.no_grad():
        got = gm(*loaded.example_inputs)["logits"]
        want = loaded.module(*loaded.example_inputs).logits
    assert not torch.allclose(got, want)  # the branches are live
    report = lora_fx.export_onnx(gm, loaded.example_inputs, tmp_path / "m.onnx", merge=True)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4


def test_kv_export_refuses_another_models_adapter_and_writes_nothing(
        folder: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path / "llama_lora"))
    code, out, err = cli(capsys, "export", f"hf:{folder['tmp'] / 'hf'}", "--adapter",
                         str(tmp_path / "llama_lora"), "--kv-cache", "-o",
                         str(tmp_path / "kv" / "model.onnx"))
    assert code == 1 and err.count("\n") == 1 and "belongs to another model" in err, err
    assert not (tmp_path / "kv").exists()


def test_fp16_kv_export_generates_with_both_engines(folder: dict[str, Any],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`--kv-cache --dtype fp16`: fp16 weights, cache and adapter file, verified against fp32;
    both engines decode it (the tiny model's greedy tokens are those of the fp32 file); bf16
    is refused with one line before anything is written."""
    tmp = folder["tmp"]
    out = tmp / "kv16" / "model.onnx"
    proc = run_cli("export", f"hf:{tmp / 'hf'}", "--adapter", str(tmp / "chat"), "--no-merge",
                   "--kv-cache", "--dtype", "fp16", "-o", str(out), "--json")
    report = json.loads(proc.stdout)
    assert report["dtype"] == "fp16" and set(report["tolerance"]) == set(report["max_abs_diff"])
    assert all(report["max_abs_diff"][k] <= report["tolerance"][k] for k in report["tolerance"])
    prompt = ["--prompt-ids", "11,12,13,14", "--max-new-tokens", "8", "--json"]
    want = {}
    for d, adapter in ((folder["dir"], "chat.onnx_adapter"), (out.parent, "chat.onnx_adapter")):
        for engine in ENGINES:
            if engine == "onnxruntime_genai" and importlib.util.find_spec(
                    "onnxruntime_genai") is None:
                continue
            code, text, err = cli(capsys, "generate", str(d), "--adapter", str(d / adapter),
                                  "--engine", engine, *prompt)
            assert code == 0, err
            want.setdefault(engine, []).append(json.loads(text)["tokens"])
    assert all(fp32 == fp16 for fp32, fp16 in want.values()), want
    bad = run_cli("export", f"hf:{tmp / 'hf'}", "--kv-cache", "--dtype", "bf16", "-o",
                  str(tmp / "kvbf" / "model.onnx"), check=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
    assert "--kv-cache exports fp32 or fp16, not --dtype bf16" in bad.stderr
    assert not (tmp / "kvbf").exists()
