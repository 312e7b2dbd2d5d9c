"""Language core: causality, KV cache equals recompute, padding, prefix, generate, score, loss, errors."""

import pytest
import torch
import torch.nn.functional as F

from mmcore.config import LMConfig, MoEConfig, preset
from mmcore.lm import LanguageModel, LMInputError, sample_next


def tiny_lm(seed=0, **overrides) -> LanguageModel:
    torch.manual_seed(seed)
    cfg = preset("tiny").lm
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return LanguageModel(cfg).eval()


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def test_forward_shapes_and_loss(lm):
    ids = torch.randint(0, 512, (2, 9))
    prefix = torch.randn(2, 3, 64)
    out = lm(ids, prefix_embeds=prefix, labels=ids)
    assert out.logits.shape == (2, 12, 512)
    assert out.hidden.shape == (2, 12, 64)
    # the last prefix position predicts the first text token; text position t predicts token t+1
    expected = F.cross_entropy(out.logits[:, 2:-1].reshape(-1, 512), ids.reshape(-1))
    assert abs(out.loss.item() - expected.item()) < 1e-5
    assert out.aux_loss is None
    labels = ids.clone()
    labels[:, :5] = -100
    masked = lm(ids, prefix_embeds=prefix, labels=labels).loss
    expected = F.cross_entropy(out.logits[:, 7:-1].reshape(-1, 512), ids[:, 5:].reshape(-1))
    assert abs(masked.item() - expected.item()) < 1e-5


def test_changing_a_future_token_never_changes_earlier_logits(lm):
    ids = torch.randint(0, 512, (1, 16))
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % 512
    a, b = lm(ids).logits, lm(changed).logits
    # equal up to float rounding: another token changes the experts' batch sizes and so the matmul blocking
    assert (a[:, :10] - b[:, :10]).abs().max().item() < 1e-5
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_decoding_equals_full_recompute(lm, padded):
    torch.manual_seed(1)
    ids = torch.randint(1, 512, (2, 12))
    prefix = torch.randn(2, 4, 64)
    mask = torch.ones(2, 16, dtype=torch.bool)
    if padded:
        mask[0, 4:7] = False  # row 0: 3 left-padding text positions after its prefix are not real
    full = lm(ids, prefix_embeds=prefix, attention_mask=mask if padded else None).logits
    cache = lm.make_cache(2, 16)
    prompt = 10  # prefix + first 6 text tokens, then decode the rest one token at a time
    first = lm(ids[:, :6], prefix_embeds=prefix, attention_mask=mask[:, :prompt] if padded else None,
               cache=cache).logits
    steps = [first]
    for pos in range(prompt, 16):
        steps.append(lm(ids[:, pos - 4:pos - 3], attention_mask=mask[:, :pos + 1] if padded else None,
                        cache=cache, start_pos=pos).logits)
    cached = torch.cat(steps, dim=1)
    real = mask.clone() if padded else torch.ones(2, 16, dtype=torch.bool)
    assert (cached - full)[real].abs().max().item() < 1e-4


def test_greedy_generation_equals_recomputed_argmax(lm):
    ids = torch.randint(0, 512, (2, 7))
    generated = lm.generate(ids, max_new_tokens=10)
    seq = ids
    for _ in range(10):
        seq = torch.cat([seq, lm(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq[:, 7:])


def test_left_padded_batch_generates_what_each_prompt_generates_alone(lm):
    torch.manual_seed(2)
    short, long = torch.randint(1, 512, (1, 5)), torch.randint(1, 512, (1, 9))
    prefix = torch.randn(2, 3, 64)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 3:7] = False  # prefix first, then the text, left-padded inside the text
    got = lm.generate(batch, prefix_embeds=prefix, attention_mask=mask, max_new_tokens=8)
    alone0 = lm.generate(short, prefix_embeds=prefix[:1], max_new_tokens=8)
    alone1 = lm.generate(long, prefix_embeds=prefix[1:], max_new_tokens=8)
    assert torch.equal(got, torch.cat([alone0, alone1]))


def test_stop_tokens_pad_the_rest_and_end_early(lm):
    ids = torch.randint(0, 512, (2, 6))
    free = lm.generate(ids, max_new_tokens=6)
    stop = int(free[0, 2])
    out = lm.generate(ids, max_new_tokens=6, stop_tokens=(stop,), pad_id=511)
    row0 = out[0].tolist()
    cut = row0.index(stop)
    assert cut <= 2 and all(t == 511 for t in row0[cut + 1:])
    stop_both = (int(free[0, 0]), int(free[1, 0]))
    assert lm.generate(ids, max_new_tokens=6, stop_tokens=stop_both).shape == (2, 1)


def test_sampling_is_reproducible_and_top_p_keeps_the_nucleus(lm):
    ids = torch.randint(0, 512, (2, 5))
    a = lm.generate(ids, max_new_tokens=6, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = lm.generate(ids, max_new_tokens=6, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # a tiny nucleus keeps only the most likely token: sampling equals greedy
    nucleus = lm.generate(ids, max_new_tokens=6, temperature=1.0, top_p=1e-6)
    assert torch.equal(nucleus, lm.generate(ids, max_new_tokens=6))
    logits = torch.tensor([[2.0, 1.0, 0.0, -5.0]])  # probs ~ .66 .24 .09 .00
    draws = torch.stack([sample_next(logits, 1.0, 0.8, torch.Generator().manual_seed(s)) for s in range(50)])
    assert set(draws.flatten().tolist()) == {0, 1}


def test_score_equals_summed_log_probabilities(lm):
    torch.manual_seed(3)
    ids = torch.randint(1, 512, (2, 6))
    ids[0, :2] = 0
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 2:4] = False
    prefix = torch.randn(2, 2, 64)
    candidates = [[5, 9, 100], [7], [300, 2]]
    got = lm.score(ids, candidates, prefix_embeds=prefix, attention_mask=mask)
    assert got.shape == (2, 3)
    for b in range(2):
        keep = mask[b, 2:]
        for i, cand in enumerate(candidates):
            seq = torch.cat([ids[b][keep], torch.tensor(cand)])[None]
            logp = lm(seq, prefix_embeds=prefix[b:b + 1]).logits.log_softmax(-1)[0]
            n = int(keep.sum()) + 2
            expected = sum(logp[n - 1 + j, t] for j, t in enumerate(cand))
            assert abs(got[b, i].item() - expected.item()) < 1e-4


def test_expert_load_and_activated_fraction(lm):
    ids = torch.randint(0, 512, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :3] = False
    lm(ids, attention_mask=mask)
    loads = lm.expert_load()
    assert len(loads) == 1 and loads[0].shape == (8,)
    assert loads[0].sum().item() == 17 * 2  # real tokens * top_k
    total = sum(p.numel() for p in lm.parameters())
    routed = lm.moe_layers[0].experts.w13.numel() + lm.moe_layers[0].experts.w2.numel()
    assert abs(lm.activated_param_fraction() - (total - routed * 6 / 8) / total) < 1e-9


def test_aux_loss_joins_the_loss_and_bias_update_moves_the_router():
    lm = tiny_lm(moe=MoEConfig(n_routed_experts=8, top_k=2, expert_hidden=32, aux_loss_alpha=0.01,
                               bias_update_gamma=0.1)).train()
    ids = torch.randint(0, 512, (2, 10))
    out = lm(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    plain = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    assert abs(out.loss.item() - plain.item() - out.aux_loss.item()) < 1e-5
    lm.update_router_bias()
    bias = lm.moe_layers[0].gate.bias
    assert all(abs(b) < 1e-9 or abs(abs(b) - 0.1) < 1e-6 for b in bias.tolist()) and bias.abs().sum() > 0


def test_a_few_steps_fit_one_batch():
    lm = tiny_lm().train()
    ids = torch.randint(0, 512, (2, 16))
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    first = None
    for _ in range(12):
        loss = lm(ids, labels=ids).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        lm.update_router_bias()
    assert loss.item() < 0.5 * first


def test_dense_only_model_works():
    lm = tiny_lm(moe=None)
    assert lm.moe_layers == [] and lm.activated_param_fraction() == 1.0
    assert lm(torch.randint(0, 512, (1, 4))).logits.shape == (1, 4, 512)


@pytest.mark.parametrize("field, kwargs", [
    ("dim", dict(dim=66, n_heads=4)),
    ("n_kv_heads", dict(n_heads=4, n_kv_heads=3)),
    ("n_dense_layers", dict(n_layers=2, n_dense_layers=3)),
    ("vocab_size", dict(vocab_size=0)),
])
def test_bad_configs_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=f"LMConfig.{field}"):
        LanguageModel(LMConfig(**kwargs))


@pytest.mark.parametrize("call, message", [
    (lambda m: m(torch.randint(0, 512, (5,))), r"input_ids: expected an integer tensor of shape \(B, T\)"),
    (lambda m: m(torch.randn(2, 5)), r"input_ids: expected an integer tensor"),
    (lambda m: m(torch.full((1, 3), 512)), r"token ids in \[0, 512\)"),
    (lambda m: m(torch.zeros(2, 3, dtype=torch.long), prefix_embeds=torch.randn(2, 4, 32)),
     r"prefix_embeds: expected shape \(2, P, 64\), found \(2, 4, 32\)"),
    (lambda m: m(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.bool)),
     r"attention_mask: expected shape \(2, 3\)"),
    (lambda m: m(torch.zeros(2, 3, dtype=torch.long), labels=torch.zeros(2, 4, dtype=torch.long)),
     r"labels: expected shape"),
    (lambda m: m(torch.zeros(1, 300, dtype=torch.long)), r"exceed the limit 256"),
    (lambda m: m.generate(torch.zeros(1, 250, dtype=torch.long), max_new_tokens=10), r"max_seq_len=256"),
    (lambda m: m.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=0), r"max_new_tokens"),
    (lambda m: m.score(torch.zeros(1, 3, dtype=torch.long), [[]]), r"candidates"),
    (lambda m: m.score(torch.zeros(1, 3, dtype=torch.long), [[600]]), r"candidates"),
    (lambda m: m(), r"give input_ids"),
])
def test_wrong_inputs_name_the_expected_shape(lm, call, message):
    with pytest.raises(LMInputError, match=message):
        call(lm)
