"""LoRA: base frozen and unchanged by training, adapter small and round-trips onto a fresh base."""

import json

import pytest
import torch

from mmcore.config import preset
from mmcore.lm import LanguageModel
from mmcore.lora import (AdapterError, LoRAExperts, LoRALinear, apply_lora, load_adapter, lora_state_dict,
                         mark_only_lora_trainable, save_adapter)


def base_lm(seed=0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(preset("tiny").lm)


def test_fresh_adapter_changes_nothing_and_base_names_stay():
    lm = base_lm()
    ids = torch.randint(0, 512, (2, 8))
    before = lm(ids).logits
    keys = set(lm.state_dict())
    apply_lora(lm, rank=4, alpha=8)
    assert torch.allclose(lm(ids).logits, before, atol=1e-6)
    assert keys <= set(lm.state_dict())
    assert sum(isinstance(m, LoRALinear) for m in lm.modules()) == 2 * 4
    assert sum(isinstance(m, LoRAExperts) for m in lm.modules()) == 1


def test_training_moves_only_the_adapter_and_it_round_trips(tmp_path):
    lm = base_lm()
    base_state = {k: v.clone() for k, v in lm.state_dict().items()}
    apply_lora(lm, rank=4, alpha=8)
    mark_only_lora_trainable(lm)
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    ids = torch.randint(0, 512, (2, 12))
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = lm(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for key, value in base_state.items():  # base weights untouched
        assert torch.equal(lm.state_dict()[key], value), key
    expert_b = lm.moe_layers[0].experts.lora_B13
    assert expert_b.abs().sum() > 0  # the expert adapters were trained too

    save_adapter(lm, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter.safetensors", "adapter_config.json"]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["rank"] == 4
    n_adapter = sum(v.numel() for v in lora_state_dict(lm).values())
    assert (tmp_path / "adapter" / "adapter.safetensors").stat().st_size < 4 * n_adapter + 10_000

    fresh = load_adapter(base_lm(), tmp_path / "adapter")
    lm.eval()
    fresh.eval()
    assert torch.allclose(fresh(ids).logits, lm(ids).logits, atol=1e-5)


def test_adapter_only_on_attention():
    lm = apply_lora(base_lm(), rank=2, targets=("attention",))
    assert not any(isinstance(m, LoRAExperts) for m in lm.modules())
    assert all(".attn." in k for k in lora_state_dict(lm))


def test_bad_adapter_inputs(tmp_path):
    with pytest.raises(ValueError, match="lora rank"):
        apply_lora(base_lm(), rank=0)
    with pytest.raises(ValueError, match="lora targets"):
        apply_lora(base_lm(), targets=("mlp",))
    with pytest.raises(AdapterError, match="adapter_config.json: adapter file not found"):
        load_adapter(base_lm(), tmp_path)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_adapter(base_lm(), tmp_path / "x")
    save_adapter(apply_lora(base_lm(), rank=2), tmp_path / "r2")
    other = apply_lora(base_lm(), rank=4)
    with pytest.raises(AdapterError, match="has shape"):
        load_adapter(other, tmp_path / "r2")
