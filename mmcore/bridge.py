"""Cross-modal attention bridge: a fixed set of learned queries reads every present modality's tokens.

Each modality's tokens are projected to the bridge width and tagged with a modality embedding and a learned
position embedding, then concatenated into one memory with a key-padding mask (absent modalities simply add no
tokens; a modality missing for one sample is masked for that sample). `n_queries` learned queries (BLIP-2 style)
run `n_layers` blocks of cross-attention over the memory, self-attention among themselves and an MLP; the result is
projected to the language model width: the prefix (B, n_queries, lm_dim) placed in front of the text.
A learned null token is always in the memory, so a sample with no modality at all still has a key to attend to.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmcore.config import BridgeConfig

MODALITIES = ("image", "volume", "audio")


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, key_ok: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, Q, C) attends to memory (B, M, C); key_ok (B, M) bool, True = a real token."""
        heads = lambda t: t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # (B, L, C) -> (B, h, L, d)
        q = heads(self.q(x))
        k, v = (heads(t) for t in self.kv(memory).chunk(2, dim=-1))
        mask = None if key_ok is None else key_ok[:, None, None, :]
        return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2))


class BridgeLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_q, self.norm_mem = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross = Attention(dim, n_heads)
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, n_heads)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, q: torch.Tensor, memory: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
        q = q + self.cross(self.norm_q(q), self.norm_mem(memory), key_ok)
        h = self.norm_self(q)
        q = q + self.self_attn(h, h)
        return q + self.mlp(self.norm_mlp(q))


class CrossModalBridge(nn.Module):
    """{modality: (tokens (B, N, C_m), mask (B, N) or None)} -> prefix (B, n_queries, lm_dim)."""

    def __init__(self, cfg: BridgeConfig, modality_dims: dict[str, int], lm_dim: int):
        super().__init__()
        cfg.validate()
        unknown = set(modality_dims) - set(MODALITIES)
        if unknown:
            raise ValueError(f"bridge modalities: unknown {sorted(unknown)}; expected some of {list(MODALITIES)}")
        self.cfg = cfg
        self.modality_dims = dict(modality_dims)
        self.proj = nn.ModuleDict({name: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.dim))
                                   for name, d in modality_dims.items()})
        self.modality_embed = nn.ParameterDict({name: nn.Parameter(torch.randn(cfg.dim) * 0.02)
                                                for name in modality_dims})
        self.pos_embed = nn.ParameterDict({name: nn.Parameter(torch.randn(cfg.max_tokens_per_modality, cfg.dim) * 0.02)
                                           for name in modality_dims})
        self.null_token = nn.Parameter(torch.randn(1, cfg.dim) * 0.02)
        self.queries = nn.Parameter(torch.randn(cfg.n_queries, cfg.dim) * 0.02)
        self.layers = nn.ModuleList(BridgeLayer(cfg.dim, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, lm_dim)

    def forward(self, tokens: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        if not tokens:
            raise ValueError("bridge: expected tokens for at least one modality, found none")
        parts, masks, batch = [], [], None
        for name, (x, mask) in tokens.items():
            if name not in self.proj:
                raise ValueError(f"bridge: no projection for modality {name!r}; this model was built for "
                                 f"{sorted(self.proj)}")
            dim = self.modality_dims[name]
            if x.ndim != 3 or x.shape[2] != dim or (batch is not None and x.shape[0] != batch):
                raise ValueError(f"{name} tokens: expected shape (B, N, {dim})"
                                 f"{'' if batch is None else f' with B={batch}'}, found {tuple(x.shape)}")
            B, N = x.shape[:2]
            batch = B
            if N > self.cfg.max_tokens_per_modality:
                raise ValueError(f"BridgeConfig.max_tokens_per_modality: {name} has {N} tokens, more than "
                                 f"{self.cfg.max_tokens_per_modality}")
            if mask is None:
                mask = torch.ones(B, N, dtype=torch.bool, device=x.device)
            elif mask.shape != (B, N):
                raise ValueError(f"{name} mask: expected shape (B, N) = ({B}, {N}), found {tuple(mask.shape)}")
            parts.append(self.proj[name](x) + self.modality_embed[name] + self.pos_embed[name][:N])  # (B, N, dim)
            masks.append(mask.to(torch.bool))
        parts.append(self.null_token.expand(batch, -1, -1))
        masks.append(torch.ones(batch, 1, dtype=torch.bool, device=parts[0].device))
        memory, key_ok = torch.cat(parts, dim=1), torch.cat(masks, dim=1)  # (B, M, dim), (B, M)
        memory = memory * key_ok.unsqueeze(-1)  # masked tokens carry zeros, never NaN or stale values
        q = self.queries.expand(batch, -1, -1)  # (B, Q, dim)
        for layer in self.layers:
            q = layer(q, memory, key_ok)
        return self.out(self.norm(q))  # (B, Q, lm_dim)
