"""transformers.Trainer trains a lorafx-injected model for real; PEFT loads what it saves."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import lora_fx
from lora_fx.errors import LoraFxError
from lora_fx.load.model import LoadedModel, load_model
from tests.helpers import tiny_gpt2

pytest.importorskip("accelerate")  # transformers' Trainer needs it
from transformers import TrainingArguments  # noqa: E402

from lora_fx.train.hf_trainer import LorafxTrainer  # noqa: E402

TARGETS = ["c_attn", "c_proj", "c_fc"]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2().save_pretrained(d)
    return d


def _dataset(n: int = 8, seq: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (n, seq), generator=g)
    return [{"input_ids": i, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": i}
            for i in ids]


def _args(out: Path, **kw: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4,
                                learning_rate=2e-2, report_to="none", use_cpu=True,
                                save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                                dataloader_num_workers=0, lr_scheduler_type="constant")
    base.update(kw)
    return TrainingArguments(**base)


def _inject(loaded: LoadedModel) -> torch.nn.Module:
    cfg = lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, fan_in_fan_out=True)
    torch.manual_seed(0)
    return lora_fx.inject(loaded.module, loaded.example_inputs, cfg, loaded.dynamic_shapes)


def test_trainer_trains_only_lora_and_saves_a_peft_adapter(gpt2_dir: Path, tmp_path: Path
                                                           ) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    loaded = load_model(f"hf:{gpt2_dir}")
    base = copy.deepcopy(loaded.module)
    gm = _inject(loaded)
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    adapter = tmp_path / "adapter"
    trainer = LorafxTrainer(gm, _args(tmp_path / "run"), train_dataset=_dataset(),
                            eval_dataset=_dataset(4), loss_fn=loaded.loss_fn,
                            input_names=loaded.extras["input_names"], adapter_dir=adapter)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert "eval_loss" in trainer.evaluate()
    for name, p in gm.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (".lora_A." in name or ".lora_B." in name), name
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json",
                                                         "adapter_model.safetensors"]
    # PEFT loads it: no warning, no missing or unexpected key, and the same function
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pm = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    result = pm.load_adapter(str(adapter), adapter_name="again")
    assert not result.missing_keys and not result.unexpected_keys
    assert len(lora_fx.branches(gm)) == 8  # 2 layers x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    assert len(load_file(str(adapter / "adapter_model.safetensors"))) == 2 * 8
    gm.eval()
    x = loaded.example_inputs
    with torch.no_grad():
        torch.testing.assert_close(gm(*x).logits, pm(input_ids=x[0], attention_mask=x[2]).logits,
                                   rtol=1e-5, atol=1e-5)
        assert not torch.allclose(gm(*x).logits, base(input_ids=x[0]).logits, atol=1e-4)


def test_checkpoints_hold_the_adapter_and_resume(gpt2_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(f"hf:{gpt2_dir}")
    run = tmp_path / "run"
    kw = dict(loss_fn=loaded.loss_fn, input_names=loaded.extras["input_names"],
              train_dataset=_dataset())
    first = LorafxTrainer(_inject(loaded), _args(run, max_steps=2, save_strategy="steps",
                                                 save_steps=2), **kw)
    first.train()
    ckpt = run / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").exists()
    assert not (ckpt / "model.safetensors").exists()  # never the frozen base
    saved = lora_fx.api.to_adapter(first.model)
    second = LorafxTrainer(_inject(loaded), _args(run, max_steps=2), **kw)
    second.train(resume_from_checkpoint=str(ckpt))  # nothing left to do: weights only reloaded
    for name, (a, b) in lora_fx.api.to_adapter(second.model).lora.items():
        torch.testing.assert_close(a, saved.lora[name][0], rtol=0, atol=0)
        torch.testing.assert_close(b, saved.lora[name][1], rtol=0, atol=0)


def test_trainer_refuses_without_loss_or_labels(gpt2_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(f"hf:{gpt2_dir}")
    gm = _inject(loaded)
    with pytest.raises(LoraFxError, match="loss_fn"):
        LorafxTrainer(gm, _args(tmp_path))
    with pytest.raises(LoraFxError, match="inject"):
        LorafxTrainer(loaded.module, _args(tmp_path), loss_fn=loaded.loss_fn)
    data = [{k: v for k, v in row.items() if k != "labels"} for row in _dataset()]
    trainer = LorafxTrainer(gm, _args(tmp_path, max_steps=1), train_dataset=data,
                            loss_fn=loaded.loss_fn, input_names=loaded.extras["input_names"])
    with pytest.raises(LoraFxError, match="no 'labels'"):
        trainer.train()
