"""int8 inference: nn.Linear and stacked experts both quantised; logits stay close to fp32."""

import copy

import pytest
import torch

from mmcore.config import preset
from mmcore.lm import LanguageModel
from mmcore.lora import apply_lora
from mmcore.moe import Experts
from mmcore.quant import Int8Experts, Int8Linear, Int8Weight, fbgemm_available, int8_summary, quantize_int8


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    lm = LanguageModel(preset("tiny").lm).eval()
    return lm, quantize_int8(copy.deepcopy(lm))


def test_every_linear_and_expert_stack_is_swapped(pair):
    _, q = pair
    summary = int8_summary(q)
    assert not any(type(m) is torch.nn.Linear or type(m) is Experts for m in q.modules())
    assert summary["int8_linear"] == 2 * 4 + 3 + 3 + 1  # attention x2 layers, dense SwiGLU, shared expert, head
    assert summary["int8_expert_stacks"] == 1
    assert summary["int8_weight_fraction"] > 0.5


def test_int8_logits_close_to_fp32(pair):
    lm, q = pair
    ids = torch.randint(0, 512, (2, 24))
    with torch.inference_mode():
        a, b = lm(ids).logits, q(ids).logits
    rel = (a - b).norm() / a.norm()
    assert rel.item() < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.8
    with torch.inference_mode():  # generation and the loss run through the int8 modules too
        assert q.generate(ids[:, :5], max_new_tokens=4).shape == (2, 4)


def test_int8_weight_matmul_matches_dequantised_product():
    torch.manual_seed(1)
    w = torch.randn(48, 40)
    q = Int8Weight(w)
    deq = q.weight_int8.float() * q.scale[:, None]
    assert (deq - w).abs().max().item() <= q.scale.max().item() / 2 + 1e-6  # rounding error of half a step
    x = torch.randn(7, 40)
    ref = x @ deq.t()
    assert ((q.matmul(x) - ref).norm() / ref.norm()).item() < 0.02  # activation quantisation adds a little
    if fbgemm_available():
        assert q._packed is not None


def test_int8_experts_equal_fp32_experts_within_quantisation_error():
    torch.manual_seed(2)
    experts = Experts(32, 16, 8)
    with torch.no_grad():
        experts.w13.normal_(std=0.3)
        experts.w2.normal_(std=0.3)
    q = Int8Experts(experts)
    x = torch.randn(20, 32)
    weights, indices = torch.rand(20, 2), torch.randint(0, 8, (20, 2))
    with torch.no_grad():
        ref = experts(x, weights, indices, "loop")
        got = q(x, weights, indices, "loop")
    assert ((got - ref).norm() / ref.norm()).item() < 0.03


def test_lora_is_merged_before_quantising():
    torch.manual_seed(3)
    lm = apply_lora(LanguageModel(preset("tiny").lm).eval(), rank=4)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ids = torch.randint(0, 512, (1, 16))
    with torch.inference_mode():
        ref = lm(ids).logits
        q = quantize_int8(copy.deepcopy(lm))
        got = q(ids).logits
    assert any(isinstance(m, Int8Linear) for m in q.modules())
    assert ((got - ref).norm() / ref.norm()).item() < 0.05
