"""MoE router and dispatch: every path equals a per-token reference, group-limited routing, bias balancing."""

import pytest
import torch
import torch.nn.functional as F

from mmcore.config import MoEConfig
from mmcore.moe import MoE, Gate, choose_dispatch, sort_by_expert

PATHS = ["loop", "grouped_mm", "gather"]


def per_token_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The definition: each token runs its own top-k experts one at a time, plus the shared experts."""
    flat = x.reshape(-1, x.size(-1))
    weights, indices, _ = moe.gate(flat)
    w13, w2 = moe.experts.w13, moe.experts.w2
    rows = []
    for t in range(flat.size(0)):
        y = moe.shared(flat[t:t + 1])[0] if moe.shared is not None else torch.zeros_like(flat[t])
        for j in range(indices.size(1)):
            e = int(indices[t, j])
            gate, up = (w13[e] @ flat[t]).chunk(2)
            y = y + weights[t, j] * (w2[e] @ (F.silu(gate) * up))
        rows.append(y)
    return torch.stack(rows).view_as(x)


def make_moe(seed=0, **overrides) -> MoE:
    torch.manual_seed(seed)
    cfg = MoEConfig(**{**dict(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=16, n_groups=4,
                               topk_groups=2), **overrides})
    moe = MoE(32, cfg)
    with torch.no_grad():  # larger weights so differences between paths would show
        moe.experts.w13.normal_(std=0.3)
        moe.experts.w2.normal_(std=0.3)
        moe.gate.weight.normal_(std=0.5)
    return moe


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("path", PATHS)
def test_every_dispatch_path_equals_per_token_reference(path, score_func):
    moe = make_moe(score_func=score_func, route_scale=2.5, dispatch=path)
    x = torch.randn(3, 7, 32)
    expected = per_token_reference(moe, x)
    with torch.no_grad():  # inference variant (scratch buffers for the loop)
        got_inference = moe(x)
    got_train = moe(x)  # autograd variant
    assert (got_inference - expected).abs().max().item() < 1e-5
    assert (got_train - expected).abs().max().item() < 1e-5


def test_dispatch_paths_give_equal_gradients():
    grads = {}
    x0 = torch.randn(2, 9, 32)
    for path in PATHS:
        moe = make_moe(dispatch=path)
        x = x0.clone().requires_grad_(True)
        moe(x).pow(2).sum().backward()
        grads[path] = (x.grad, moe.experts.w13.grad, moe.experts.w2.grad, moe.gate.weight.grad)
    for path in ("grouped_mm", "gather"):
        for a, b in zip(grads["loop"], grads[path]):
            assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5  # relative: gradients reach ~100


def test_no_expert_skips_and_empty_experts_are_fine():
    moe = make_moe(dispatch="loop", n_groups=1, topk_groups=1)
    with torch.no_grad():
        moe.gate.bias[:] = torch.tensor([9.0, 9.0, 0, 0, 0, 0, 0, 0])  # every token picks experts 0 and 1
    x = torch.randn(1, 5, 32)
    load = None
    for path in PATHS:
        moe.cfg.dispatch = path
        with torch.no_grad():
            assert (moe(x) - per_token_reference(moe, x)).abs().max().item() < 1e-5
        load = moe.last_load
    assert load.tolist() == [5, 5, 0, 0, 0, 0, 0, 0]


def test_sort_by_expert_gives_contiguous_slices():
    indices = torch.tensor([[2, 0], [1, 2], [0, 3]])
    order, token_of, counts = sort_by_expert(indices, 4)
    assert counts.tolist() == [2, 1, 2, 1]
    assert indices.flatten()[order].tolist() == [0, 0, 1, 2, 2, 3]
    assert token_of.tolist() == [0, 2, 1, 0, 1, 2]


def test_group_limited_routing_picks_only_inside_selected_groups():
    torch.manual_seed(1)
    cfg = MoEConfig(n_routed_experts=16, top_k=4, expert_hidden=8, n_groups=4, topk_groups=2,
                    score_func="sigmoid")
    gate = Gate(24, cfg)
    with torch.no_grad():
        gate.weight.normal_()
        # all-negative biases: masking dropped groups with 0 instead of -inf would pick from dropped groups
        gate.bias[:] = -5.0 + 0.1 * torch.randn(16)
    x = torch.randn(200, 24)
    weights, indices, scores = gate(x)
    biased = (scores + gate.bias).view(200, 4, 4)
    group_scores = biased.topk(2, dim=-1)[0].sum(-1)
    kept = group_scores.topk(2, dim=-1)[1]  # (T, 2)
    chosen_groups = indices // 4
    for t in range(200):
        assert set(chosen_groups[t].tolist()) <= set(kept[t].tolist())
    # within the kept groups the choice is the plain top-k of the biased scores
    masked = biased.clone()
    drop = torch.ones(200, 4, dtype=torch.bool).scatter_(1, kept, False)
    masked[drop] = float("-inf")
    expected = masked.flatten(1).topk(4, dim=-1)[1]
    assert torch.equal(indices.sort(-1)[0], expected.sort(-1)[0])
    # sigmoid weights come from the unbiased scores and are renormalised to sum to route_scale (1.0)
    assert torch.allclose(weights.sum(-1), torch.ones(200), atol=1e-6)
    assert torch.allclose(weights, (scores.gather(1, indices) / scores.gather(1, indices).sum(-1, keepdim=True)))


def test_one_kept_group_confines_every_token_to_one_group():
    torch.manual_seed(2)
    plain = Gate(24, MoEConfig(n_routed_experts=16, top_k=2, expert_hidden=8))
    grouped = Gate(24, MoEConfig(n_routed_experts=16, top_k=2, expert_hidden=8, n_groups=8, topk_groups=1))
    grouped.load_state_dict(plain.state_dict())
    x = torch.randn(100, 24)
    _, i_plain, _ = plain(x)
    _, i_grouped, _ = grouped(x)
    assert all(len(set((row // 2).tolist())) == 1 for row in i_grouped)  # both experts from the one kept group
    assert sum(len(set((row // 2).tolist())) > 1 for row in i_plain) > 50  # unrestricted top-k spans groups


def test_softmax_weights_are_not_renormalised_by_default():
    gate = Gate(16, MoEConfig(n_routed_experts=8, top_k=2, expert_hidden=8, route_scale=3.0))
    x = torch.randn(10, 16)
    weights, indices, scores = gate(x)
    assert torch.allclose(scores.sum(-1), torch.ones(10), atol=1e-6)
    assert torch.allclose(weights, 3.0 * scores.gather(1, indices))


def test_bias_balancing_lowers_max_over_mean_load_on_skewed_input():
    torch.manual_seed(3)
    cfg = MoEConfig(n_routed_experts=8, n_shared_experts=0, top_k=2, expert_hidden=8, bias_update_gamma=0.01,
                    dispatch="gather")
    moe = MoE(16, cfg).train()
    with torch.no_grad():
        moe.gate.weight.normal_()
    direction = moe.gate.weight[0].detach() / moe.gate.weight[0].norm()
    data = torch.randn(1, 256, 16) * 0.5 + direction  # skewed: most tokens prefer expert 0
    imbalance = []  # max/mean expert load per step
    for _ in range(80):
        with torch.no_grad():
            moe(data)
        imbalance.append((moe.last_load.max() / moe.last_load.mean()).item())
        assert moe.load_since_update.sum().item() == 256 * 2  # counted since the last update
        moe.update_bias()
    late = sum(imbalance[-10:]) / 10
    assert imbalance[0] > 3.0
    assert late < 0.6 * imbalance[0]
    assert moe.gate.bias[0] < 0  # the overloaded expert was pushed down
    assert moe.gate.weight.grad is None  # balancing never touches the gate's gradient path


def test_update_bias_step_is_gamma_sign():
    cfg = MoEConfig(n_routed_experts=4, top_k=1, expert_hidden=8, bias_update_gamma=0.5)
    moe = MoE(8, cfg)
    moe.load_since_update.copy_(torch.tensor([10.0, 2.0, 4.0, 4.0]))  # mean 5
    moe.update_bias()
    assert moe.gate.bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
    assert moe.load_since_update.sum().item() == 0


def test_sequence_balance_loss_matches_formula_and_has_gradient():
    torch.manual_seed(4)
    moe = make_moe(aux_loss_alpha=0.01, score_func="sigmoid")
    x = torch.randn(2, 6, 32)
    moe(x)
    aux = moe.aux_loss
    _, indices, scores = moe.gate(x.reshape(-1, 32))
    indices, scores = indices.view(2, 6, -1), scores.view(2, 6, -1)
    E, k = 8, 2
    total = 0.0
    for b in range(2):
        f = torch.zeros(E)
        for e in indices[b].flatten().tolist():
            f[e] += 1
        f = f * E / (k * 6)
        p = (scores[b] / scores[b].sum(-1, keepdim=True)).mean(0)
        total += (f * p).sum()
    assert abs(aux.item() - 0.01 * total.item() / 2) < 1e-7
    aux.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_load_excludes_padding_tokens():
    moe = make_moe()
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    with torch.no_grad():
        moe(x, mask)
    assert moe.last_load.sum().item() == 8 * 2


def test_activated_params():
    moe = make_moe()
    active, total = moe.activated_params()
    routed = 8 * (2 * 16 * 32 + 32 * 16)
    assert total == routed + 8 * 32 + 3 * 32 * 16
    assert active == total - routed + routed * 2 // 8


def test_auto_dispatch_rules():
    cpu = torch.device("cpu")
    assert choose_dispatch(cpu, 10**6) in ("loop", "grouped_mm")
    assert choose_dispatch(torch.device("cuda"), 10**6) in ("grouped_mm", "loop")


@pytest.mark.parametrize("field, kwargs", [
    ("top_k", dict(n_routed_experts=4, top_k=5)),
    ("n_groups", dict(n_routed_experts=6, n_groups=4)),
    ("topk_groups", dict(n_groups=2, topk_groups=3)),
    ("score_func", dict(score_func="relu")),
    ("dispatch", dict(dispatch="dense")),
])
def test_bad_configs_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}"):
        MoE(16, MoEConfig(**kwargs))


def test_wrong_input_shape_names_expected_shape():
    moe = make_moe()
    with pytest.raises(ValueError, match=r"expected shape \(B, T, 32\), found \(4, 32\)"):
        moe(torch.randn(4, 32))
