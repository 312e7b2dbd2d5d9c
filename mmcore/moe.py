"""Mixture-of-experts feed-forward in the DeepSeek-V3 style: a router (`Gate`), stacked routed experts, shared experts.

Routing: scores (softmax or sigmoid, fp32) plus a per-expert selection bias decide *which* experts a token uses;
the unbiased scores give the mixing weights (auxiliary-loss-free balancing). With `n_groups > 1` a token first keeps
its `topk_groups` best expert groups and picks its top-k experts only inside them (dropped groups are -inf).

Dispatch never evaluates an expert on a token that was not routed to it. Three paths, equal up to float rounding:
  grouped_mm  tokens sorted by expert, two grouped matmuls (`F.grouped_mm`) over contiguous per-expert slices
  loop        the same sorted slices, one plain matmul per expert that received tokens
  gather      per-token gather of the chosen experts' weights (few tokens, e.g. one decode step)
`auto` picks per device and token count from measured rules (`DISPATCH_RULES`; see docs/core.md for the numbers).
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from mmcore.config import MoEConfig

# `auto` rules, from `python -m benchmarks core` (dispatch_ms_by_tokens; numbers in docs/core.md). On this 2-core
# AVX-512 CPU the per-expert loop was fastest or tied at every size: grouped_mm on CPU is a composite loop with extra
# copies, and gather copies k weight matrices per token (slower than the loop even at 2 tokens). On CUDA grouped_mm
# is one kernel and gather avoids the host sync for decode steps (not measurable here; the rule follows gpt-fast and
# HF practice). Each rule: (device type, largest tokens*top_k count that uses gather, path above that count).
DISPATCH_RULES = {
    "cpu": (0, "loop"),
    "cuda": (16, "grouped_mm"),
}
_HAS_GROUPED_MM = hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """(N, K) rows grouped by `offs` (int32 cumulative ends) times (G, K, M) -> (N, M)."""
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm(a, b, offs=offs)
    return torch._grouped_mm(a, b, offs=offs)


def choose_dispatch(device: torch.device, n_assignments: int) -> str:
    """The dispatch path `auto` uses for `n_assignments` = tokens * top_k on `device`."""
    gather_max, large = DISPATCH_RULES.get(device.type, DISPATCH_RULES["cpu"])
    if n_assignments <= gather_max:
        return "gather"
    if large == "grouped_mm" and not _HAS_GROUPED_MM:
        return "loop"
    return large


class Gate(nn.Module):
    """Router: (T, dim) -> mixing weights (T, k), expert indices (T, k), full scores (T, E) in fp32."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.top_k
        self.n_groups, self.topk_groups = cfg.n_groups, cfg.topk_groups
        self.score_func, self.route_scale = cfg.score_func, cfg.route_scale
        self.normalize = cfg.score_func == "sigmoid" if cfg.normalize_topk is None else cfg.normalize_topk
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, dim))
        nn.init.normal_(self.weight, std=0.02)
        # Selection bias (aux-loss-free balancing): moved by `MoE.update_bias`, never by gradients; always fp32.
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        selection = scores + self.bias
        if self.n_groups > 1:
            grouped = selection.view(x.size(0), self.n_groups, -1)  # (T, G, E/G)
            # Group strength = sum of its two best (biased) scores, as DeepSeek-V3; one expert per group: its score.
            group_scores = grouped.topk(min(2, grouped.size(-1)), dim=-1)[0].sum(dim=-1)  # (T, G)
            keep = group_scores.topk(self.topk_groups, dim=-1)[1]
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            selection = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        indices = selection.topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, indices)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.route_scale).type_as(x), indices, scores


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): the dense feed-forward and the shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def sort_by_expert(indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the T*k (token, expert) assignments by expert.

    Returns `order` (T*k,) positions into indices.flatten(), `token_of` (T*k,) the token of each sorted assignment,
    and `counts` (E,) assignments per expert, so expert e owns the contiguous slice counts[:e].sum() .. +counts[e].
    """
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    token_of = order // indices.size(1)
    counts = torch.bincount(flat, minlength=n_experts)
    return order, token_of, counts


_workspace = threading.local()  # per-thread scratch buffers for inference dispatch (see `scratch`)
WORKSPACE_MAX_ELEMENTS = 1 << 23  # 32 MB of fp32 per buffer; larger requests allocate fresh tensors


def scratch(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A reusable uninitialised buffer for inference-only intermediates.

    Allocating a fresh tens-of-MB tensor per call costs page faults that, on CPU, take as long as the gather they
    hold (measured 15 ms vs 3.5 ms for a 16384 x 512 index_select). Buffers are per thread and shared by every
    layer: each is fully consumed before the next layer runs. Never returned to callers.
    """
    n = math.prod(shape)
    if n > WORKSPACE_MAX_ELEMENTS:
        return torch.empty(shape, device=like.device, dtype=like.dtype)
    store = getattr(_workspace, "buffers", None)
    if store is None:
        store = _workspace.buffers = {}
    key = (name, like.device, like.dtype, torch.is_inference_mode_enabled())
    buf = store.get(key)
    if buf is None or buf.numel() < n:
        buf = store[key] = torch.empty(n, device=like.device, dtype=like.dtype)
    return buf[:n].view(shape)


def release_workspace() -> None:
    """Free this thread's dispatch scratch buffers."""
    _workspace.buffers = {}


class Experts(nn.Module):
    """Routed SwiGLU experts stored as stacked 3-D weights: w13 (E, 2*hidden, dim) = [w1; w3], w2 (E, dim, hidden)."""

    def __init__(self, dim: int, hidden: int, n_experts: int):
        super().__init__()
        self.dim, self.hidden, self.n_experts = dim, hidden, n_experts
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        nn.init.normal_(self.w13, std=0.02)
        nn.init.normal_(self.w2, std=0.02)

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (w13, w2) the paths compute with; LoRA (mmcore.lora) overrides this to add its low-rank deltas."""
        return self.w13, self.w2

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, path: str,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """Add the weighted expert outputs of (T, dim) tokens routed by (T, k) weights/indices to `out` (T, dim)."""
        if out is None:
            out = torch.zeros_like(x)
        if path == "gather":
            return out + self.forward_gather(x, weights, indices)
        order, token_of, counts = sort_by_expert(indices, self.n_experts)
        w13, w2 = self.stacked_weights()
        w_sorted = weights.flatten()[order].unsqueeze(-1)  # (T*k, 1) mixing weight of each sorted assignment
        inference = not torch.is_grad_enabled() or not (x.requires_grad or w13.requires_grad or w_sorted.requires_grad)
        inference = inference and not torch.is_autocast_enabled(x.device.type)  # out= buffers need one fixed dtype
        if path == "grouped_mm":
            y_sorted = self.forward_grouped_mm(x[token_of], w_sorted, counts, w13, w2)
        elif path == "loop" and inference:
            y_sorted = self.forward_loop_inplace(x, token_of, w_sorted, counts, w13, w2)
        elif path == "loop":
            y_sorted = self.forward_loop(x[token_of], w_sorted, counts, w13, w2)
        else:
            raise ValueError(f"MoEConfig.dispatch: unknown path {path!r}")
        y_sorted = y_sorted.to(out.dtype)  # under autocast the expert matmuls may run in a lower precision
        return out.index_add_(0, token_of, y_sorted) if inference else out.index_add(0, token_of, y_sorted)

    def forward_grouped_mm(self, x_sorted, w_sorted, counts, w13, w2) -> torch.Tensor:
        offs = counts.cumsum(0, dtype=torch.int32)
        gate, up = grouped_mm(x_sorted, w13.transpose(1, 2), offs).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up * w_sorted, w2.transpose(1, 2), offs)

    def forward_loop(self, x_sorted, w_sorted, counts, w13, w2) -> torch.Tensor:
        """Autograd-friendly loop: one matmul pair per expert that received tokens, outputs concatenated."""
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):  # one host sync; experts with no tokens cost nothing
            if n == 0:
                continue
            gate, up = (x_sorted[start:start + n] @ w13[e].t()).chunk(2, dim=-1)
            outs.append((F.silu(gate) * up * w_sorted[start:start + n]) @ w2[e].t())
            start += n
        return torch.cat(outs) if outs else x_sorted.new_zeros(0, self.dim)

    def forward_loop_inplace(self, x, token_of, w_sorted, counts, w13, w2) -> torch.Tensor:
        """The same loop for inference, writing every intermediate into reused scratch buffers (no allocations)."""
        N, H = token_of.numel(), self.hidden
        x_sorted = torch.index_select(x, 0, token_of, out=scratch("x_sorted", (N, self.dim), x))
        h = scratch("h", (N, 2 * H), x)  # [gate | up] per assignment
        act = scratch("act", (N, H), x)
        y_sorted = scratch("y_sorted", (N, self.dim), x)
        spans, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                spans.append((e, start, start + n))
                start += n
        for e, a, b in spans:
            torch.mm(x_sorted[a:b], w13[e].t(), out=h[a:b])
        # one elementwise pass over all experts: act = silu(gate) * up * routing weight
        torch.mul(F.silu(h[:, :H], inplace=True), h[:, H:], out=act).mul_(w_sorted)
        for e, a, b in spans:
            torch.mm(act[a:b], w2[e].t(), out=y_sorted[a:b])
        return y_sorted

    def forward_gather(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """gpt-fast style: gather each token's k expert weight matrices; no sort, no data-dependent shapes."""
        w13, w2 = self.stacked_weights()
        gate, up = torch.einsum("td,tkhd->tkh", x, w13[indices]).chunk(2, dim=-1)  # (T, k, hidden) each
        expert_out = torch.einsum("tkh,tkdh->tkd", F.silu(gate) * up, w2[indices])  # (T, k, dim)
        return torch.einsum("tkd,tk->td", expert_out, weights)


class MoE(nn.Module):
    """Shared experts + routed experts, with load accounting for the aux-loss-free bias update."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.dim = dim
        self.gate = Gate(dim, cfg)
        self.experts = Experts(dim, cfg.expert_hidden, cfg.n_routed_experts)
        # DeepSeek: all shared experts form one SwiGLU of width n_shared * expert_hidden.
        self.shared = SwiGLU(dim, cfg.n_shared_experts * cfg.expert_hidden) if cfg.n_shared_experts else None
        # Tokens per expert in the last forward, and summed over training forwards since the last bias update.
        self.register_buffer("last_load", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.register_buffer("load_since_update", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, dim) -> (B, T, dim). `token_mask` (B, T) bool marks real tokens (padding is left out of the load)."""
        if x.dim() != 3 or x.size(-1) != self.dim:
            raise ValueError(f"MoE input: expected shape (B, T, {self.dim}), found {tuple(x.shape)}")
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        weights, indices, scores = self.gate(flat)
        path = self.cfg.dispatch
        if path == "auto":
            path = choose_dispatch(x.device, B * T * self.cfg.top_k)
        # routed outputs are accumulated straight into the shared experts' output
        shared = self.shared(flat) if self.shared is not None else None
        y = self.experts(flat, weights, indices, path, out=shared)
        self._account(indices, scores, B, T, token_mask)
        return y.view(B, T, D)

    @torch.no_grad()
    def _count(self, indices: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        flat = indices if token_mask is None else indices[token_mask.reshape(-1)]
        return torch.bincount(flat.flatten(), minlength=self.cfg.n_routed_experts).float()

    def _account(self, indices, scores, B, T, token_mask) -> None:
        load = self._count(indices, token_mask)
        self.last_load.copy_(load)
        if self.training:
            self.load_since_update += load
        self.aux_loss = None
        if self.cfg.aux_loss_alpha > 0 and torch.is_grad_enabled():
            self.aux_loss = self.sequence_balance_loss(indices.view(B, T, -1), scores.view(B, T, -1), token_mask)

    def sequence_balance_loss(self, indices: torch.Tensor, scores: torch.Tensor,
                              token_mask: torch.Tensor | None) -> torch.Tensor:
        """DeepSeek-V3 sequence-wise balance loss: alpha * mean over sequences of sum_i f_i * P_i.

        f_i = E / (k * T) * (tokens of the sequence routed to i); P_i = mean over the sequence of the scores
        normalised over all experts. Both use only real tokens when `token_mask` is given.
        """
        E, k = self.cfg.n_routed_experts, self.cfg.top_k
        B, T, _ = indices.shape
        ones = torch.ones(B, T, dtype=scores.dtype, device=scores.device)
        mask = ones if token_mask is None else token_mask.to(scores.dtype)
        n_real = mask.sum(dim=1).clamp(min=1)  # (B,)
        routed = torch.zeros(B, T, E, dtype=scores.dtype, device=scores.device).scatter_(2, indices, 1.0)
        f = (routed * mask.unsqueeze(-1)).sum(dim=1) * E / (k * n_real.unsqueeze(-1))  # (B, E)
        probs = scores / scores.sum(dim=-1, keepdim=True)
        p = (probs * mask.unsqueeze(-1)).sum(dim=1) / n_real.unsqueeze(-1)  # (B, E)
        return self.cfg.aux_loss_alpha * (f * p).sum(dim=-1).mean()

    @torch.no_grad()
    def update_bias(self) -> None:
        """bias += gamma * sign(mean_load - load) from the load counted since the last call (all ranks), then reset."""
        load = self.load_since_update.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        if self.cfg.bias_update_gamma > 0 and load.sum() > 0:
            self.gate.bias += self.cfg.bias_update_gamma * torch.sign(load.mean() - load)
        self.load_since_update.zero_()

    def activated_params(self) -> tuple[int, int]:
        """(parameters one token uses, all parameters) of this layer: top_k of the routed experts plus the rest."""
        total = sum(p.numel() for p in self.parameters())
        routed = self.experts.w13.numel() + self.experts.w2.numel()
        active = total - routed + math.ceil(routed * self.cfg.top_k / self.cfg.n_routed_experts)
        return active, total
