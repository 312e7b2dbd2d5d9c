"""`python -m benchmarks core`: the MoE layer against its peers, KV-cache generation, int8 inference.

MoE layer (as the design asks): 4096 tokens, dim 512, 16 routed experts of hidden 256, top-4, 1 shared expert.
Peers, each with the same router and shared expert so only the routed-expert computation differs:
  naive        every expert on every token, combined with a dense (T, E) weight matrix that is zero where unrouted
  gather loop  HF transformers' Mixtral block: per expert `where(mask)` then `index_add_` (re-implemented here)
  dense        one SwiGLU with the same activated parameters (hidden = (top_k + shared) * 256)
LM figures use the `small` preset. The int8 agreement needs a model whose predictions mean something, so the small
LM is first trained briefly (byte-level) on the Python documentation text shipped in the standard library
(`pydoc_data.topics`), and agreement is measured on topics held out of training.
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F

from benchmarks.harness import time_interleaved

GOALS = {
    "moe_vs_naive_speedup": (">=", 3.0),
    "moe_vs_gather_loop_speedup": (">=", 0.95),
    "moe_vs_dense_time_ratio": ("<=", 1.1),
    "kv_cache_speedup": (">=", 5.0),
    "int8_speedup": (">=", 2.0),
    "int8_top1_agreement": (">=", 0.99),
}

MOE_TOKENS, MOE_DIM, N_EXPERTS, EXPERT_HIDDEN, TOP_K = 4096, 512, 16, 256, 4


def add_arguments(parser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats per figure")
    parser.add_argument("--train-steps", type=int, default=40, help="steps of byte-level training for int8 agreement")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--gen-tokens", type=int, default=256, help="tokens generated for the KV-cache figure")


# ---- peers ----------------------------------------------------------------------------------------------------------

def naive_all_experts(moe, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, then a dense combine: the cost floor any real dispatch must beat."""
    weights, indices, _ = moe.gate(x)
    combine = torch.zeros(x.size(0), moe.cfg.n_routed_experts, dtype=x.dtype).scatter_(1, indices, weights)
    w13, w2 = moe.experts.w13, moe.experts.w2
    gate, up = torch.einsum("td,ehd->eth", x, w13).chunk(2, dim=-1)  # (E, T, H) each
    out = torch.einsum("eth,edh->etd", F.silu(gate) * up, w2)  # (E, T, D)
    return torch.einsum("etd,te->td", out, combine) + moe.shared(x)


def hf_mixtral_loop(moe, x: torch.Tensor) -> torch.Tensor:
    """HF transformers' Mixtral experts forward (stacked gate_up/down weights, per-expert where + index_add_)."""
    top_k_weights, top_k_index, _ = moe.gate(x)
    gate_up_proj, down_proj = moe.experts.w13, moe.experts.w2
    final = torch.zeros_like(x)
    expert_mask = F.one_hot(top_k_index, num_classes=moe.cfg.n_routed_experts).permute(2, 1, 0)  # (E, k, T)
    expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = x[token_idx]
        gate, up = F.linear(current_state, gate_up_proj[expert_idx]).chunk(2, dim=-1)
        current = F.linear(F.silu(gate) * up, down_proj[expert_idx])
        current = current * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, current.to(final.dtype))
    return final + moe.shared(x)


# ---- figures --------------------------------------------------------------------------------------------------------

def inference(fn, *args):
    def run():
        with torch.inference_mode():
            return fn(*args)
    return run


def moe_figures(repeats: int) -> dict:
    from mmcore.config import MoEConfig
    from mmcore.moe import MoE, SwiGLU, choose_dispatch

    torch.manual_seed(0)
    cfg = MoEConfig(n_routed_experts=N_EXPERTS, n_shared_experts=1, top_k=TOP_K, expert_hidden=EXPERT_HIDDEN)
    moe = MoE(MOE_DIM, cfg).eval()
    dense = SwiGLU(MOE_DIM, (TOP_K + 1) * EXPERT_HIDDEN).eval()
    x = torch.randn(1, MOE_TOKENS, MOE_DIM)
    flat = x[0]
    with torch.inference_mode():
        ref = hf_mixtral_loop(moe, flat)
        assert (moe(x)[0] - ref).abs().max() < 1e-4 and (naive_all_experts(moe, flat) - ref).abs().max() < 1e-4
    t = time_interleaved({"moe": inference(moe, x), "naive": inference(naive_all_experts, moe, flat),
                          "gather_loop": inference(hf_mixtral_loop, moe, flat), "dense": inference(dense, x)},
                         repeats=repeats)
    out = {
        "moe_vs_naive_speedup": t["naive"] / t["moe"],
        "moe_vs_gather_loop_speedup": t["gather_loop"] / t["moe"],
        "moe_vs_dense_time_ratio": t["moe"] / t["dense"],
        "moe_ms": t["moe"] * 1e3, "naive_ms": t["naive"] * 1e3, "gather_loop_ms": t["gather_loop"] * 1e3,
        "dense_ms": t["dense"] * 1e3, "moe_path": choose_dispatch(x.device, MOE_TOKENS * TOP_K),
    }
    decode = torch.randn(1, 8, MOE_DIM)
    t = time_interleaved({"moe": inference(moe, decode), "dense": inference(dense, decode)},
                         repeats=repeats * 10, warmup=5)
    out["decode_moe_vs_dense_time_ratio"] = t["moe"] / t["dense"]
    out["decode_moe_ms"] = t["moe"] * 1e3
    # the measurement behind `auto`: every path at a range of token counts (ms)
    table = {}
    for tokens in (2, 8, 64, 512, MOE_TOKENS):
        xt = torch.randn(1, tokens, MOE_DIM)
        fns = {}
        for path in ("loop", "grouped_mm", "gather"):
            if path == "gather" and tokens > 64:  # gathers (T, k, 2H, D) weight copies: hopeless beyond that
                continue
            fns[path] = inference(lambda p=path: (setattr(moe.cfg, "dispatch", p), moe(xt)))
        res = time_interleaved(fns, repeats=max(3, repeats if tokens >= 512 else repeats * 4))
        table[str(tokens)] = {k: round(v * 1e3, 3) for k, v in res.items()}
    moe.cfg.dispatch = "auto"
    out["dispatch_ms_by_tokens"] = table
    return out


def held_out_text() -> tuple[bytes, bytes]:
    """Training and held-out natural-language text: Python's own documentation topics (stdlib, always present)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = {n for i, n in enumerate(names) if i % 7 == 0}
    train = "\n\n".join(topics[n] for n in names if n not in held).encode("utf-8")
    test = "\n\n".join(topics[n] for n in names if n in held).encode("utf-8")
    return train, test


def train_small_lm(steps: int):
    from mmcore.config import preset
    from mmcore.lm import LanguageModel

    torch.manual_seed(0)
    lm = LanguageModel(preset("small").lm)
    train, _ = held_out_text()
    data = torch.tensor(list(train), dtype=torch.long)  # byte-level: token id = byte value
    opt = torch.optim.AdamW(lm.parameters(), lr=2e-3, weight_decay=0.0)
    batch, seq = 8, 128
    gen = torch.Generator().manual_seed(0)
    loss = None
    lm.train()
    for step in range(steps):
        for group in opt.param_groups:  # short warmup then cosine
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        ids = torch.stack([data[s:s + seq] for s in starts.tolist()])
        loss = lm(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        lm.update_router_bias()
    return lm.eval(), (loss.item() if loss is not None else None)


def lm_figures(args) -> dict:
    from mmcore.quant import int8_summary, quantize_int8

    t0 = time.perf_counter()
    lm, train_loss = train_small_lm(args.train_steps)
    out = {"lm_weights": f"small preset trained {args.train_steps} steps on pydoc_data.topics bytes",
           "lm_train_loss": train_loss, "lm_train_s": time.perf_counter() - t0}

    # KV cache: greedy generation with the cache vs recomputing the whole sequence for every new token
    prompt = torch.randint(32, 127, (1, 16))
    n_new = args.gen_tokens

    with torch.inference_mode():  # the two produce the same tokens
        assert torch.equal(lm.generate(prompt, max_new_tokens=8), greedy_by_recompute(lm, prompt, 8))
    t = time_interleaved({"cached": inference(lambda: lm.generate(prompt, max_new_tokens=n_new)),
                          "recompute": inference(greedy_by_recompute, lm, prompt, n_new)},
                         repeats=3, warmup=0)
    out["kv_cache_speedup"] = t["recompute"] / t["cached"]
    out["generate_tokens_per_s"] = n_new / t["cached"]

    # int8: speed on a (4, 256) forward, top-1 agreement on held-out text
    q = quantize_int8(copy.deepcopy(lm))
    out.update({f"int8_{k}" if not k.startswith("int8") else k: v for k, v in int8_summary(q).items()})
    _, test = held_out_text()
    data = torch.tensor(list(test), dtype=torch.long)
    seq, n_windows = 256, 16
    windows = torch.stack([data[i * seq:(i + 1) * seq] for i in range(n_windows)])
    with torch.inference_mode():
        agree, total, nll_fp, nll_q = 0, 0, 0.0, 0.0
        for chunk in windows.split(4):
            a, b = lm(chunk, labels=chunk), q(chunk, labels=chunk)
            agree += (a.logits.argmax(-1) == b.logits.argmax(-1)).sum().item()
            total += chunk.numel()
            nll_fp += a.loss.item() * len(chunk)
            nll_q += b.loss.item() * len(chunk)
    out["int8_top1_agreement"] = agree / total
    out["held_out_loss_fp32"] = nll_fp / n_windows
    out["held_out_loss_int8"] = nll_q / n_windows
    batch = windows[:4]
    t = time_interleaved({"fp32": inference(lm, batch), "int8": inference(q, batch)}, repeats=args.repeats)
    out["int8_speedup"] = t["fp32"] / t["int8"]
    out["lm_forward_fp32_ms"] = t["fp32"] * 1e3
    out["lm_forward_int8_ms"] = t["int8"] * 1e3
    return out


def greedy_by_recompute(lm, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding without a cache: the whole sequence runs again for every new token."""
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, lm(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.size(1):]


def run(args) -> dict:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = {"torch_threads": torch.get_num_threads()}
    out.update(moe_figures(args.repeats))
    out.update(lm_figures(args))
    return out
