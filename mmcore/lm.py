"""Decoder-only language core: RMSNorm, RoPE, grouped-query attention, dense SwiGLU blocks then MoE blocks.

Inputs may carry a prefix of embeddings (the bridge output) in front of the text, and batched prompts are
left-padded with an `attention_mask` (True = real token). Positions count real tokens only, so a left-padded prompt
sees exactly the positions it would see alone. Generation uses a preallocated KV cache written in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcore.config import LMConfig
from mmcore.errors import InputError
from mmcore.moe import MoE, SwiGLU


class LMInputError(InputError, ValueError):
    """A tensor given to the language core has the wrong shape, dtype or value; the message names the argument."""


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, P+T, vocab)
    loss: torch.Tensor | None = None  # next-token loss over text positions (+ aux_loss when configured)
    aux_loss: torch.Tensor | None = None  # sequence-wise balance loss summed over MoE layers
    hidden: torch.Tensor | None = None  # (B, P+T, dim) final-norm hidden states


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        x32 = x.float()  # low precision: normalise in fp32
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (max_len, head_dim/2) for rotary position embeddings."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) by per-position (B, 1, T, hd/2) tables; pairs are (first half, second half)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class KVCache:
    """Preallocated keys and values per layer, (B, n_kv_heads, max_len, head_dim), written in place."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.batch, self.max_len = batch, max_len

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H_kv, T, hd) at positions start..start+T and return every key/value up to there."""
        end = start + k.size(2)
        if end > self.max_len:
            raise LMInputError(f"KVCache: positions up to {end} exceed the cache length {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def repeat_interleave(self, n: int) -> KVCache:
        """A copy with every row repeated n times (row b becomes rows b*n .. b*n+n-1)."""
        out = KVCache.__new__(KVCache)
        out.k = [k.repeat_interleave(n, dim=0) for k in self.k]
        out.v = [v.repeat_interleave(n, dim=0) for v in self.v]
        out.batch, out.max_len = self.batch * n, self.max_len
        return out


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, start_pos: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, start_pos, k, v)  # (B, H_kv, start_pos+T, hd)
        # grouped-query attention: each kv head serves n_heads / n_kv_heads query heads (no copies)
        gqa = self.n_kv_heads != self.n_heads
        if mask is None:  # plain causal attention over keys 0..T-1 (no cache, no padding)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        is_moe = cfg.moe is not None and layer >= cfg.n_dense_layers
        self.ffn = MoE(cfg.dim, cfg.moe) if is_moe else SwiGLU(cfg.dim, cfg.dense_hidden)

    def forward(self, x, cos, sin, mask, cache, start_pos, token_mask) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, self.layer, start_pos)
        h = self.ffn_norm(x)
        return x + (self.ffn(h, token_mask) if isinstance(self.ffn, MoE) else self.ffn(h))


class LanguageModel(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # residual projections scaled down with depth (GPT-2)
            if name.endswith(("attn.wo.weight", "ffn.w2.weight", "shared.w2.weight", "experts.w2")):
                nn.init.normal_(p, std=0.02 / (2 * cfg.n_layers) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoE)]

    # ---- input checks -------------------------------------------------------------------------------------------

    def _check_inputs(self, input_ids, prefix_embeds, attention_mask, cache, start_pos) -> tuple[int, int, int]:
        """Validate shapes; return (B, P, T)."""
        if input_ids is None and prefix_embeds is None:
            raise LMInputError("LanguageModel: give input_ids (B, T) and/or prefix_embeds (B, P, dim); found neither")
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
                raise LMInputError(f"input_ids: expected an integer tensor of shape (B, T), found "
                                   f"{input_ids.dtype} {tuple(input_ids.shape)}")
            if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.cfg.vocab_size):
                raise LMInputError(f"input_ids: expected token ids in [0, {self.cfg.vocab_size}), found "
                                   f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        B = input_ids.size(0) if input_ids is not None else prefix_embeds.size(0)
        T = input_ids.size(1) if input_ids is not None else 0
        P = 0
        if prefix_embeds is not None:
            if prefix_embeds.dim() != 3 or prefix_embeds.size(0) != B or prefix_embeds.size(2) != self.cfg.dim:
                raise LMInputError(f"prefix_embeds: expected shape ({B}, P, {self.cfg.dim}), found "
                                   f"{tuple(prefix_embeds.shape)}")
            P = prefix_embeds.size(1)
        total = start_pos + P + T
        if attention_mask is not None and tuple(attention_mask.shape) != (B, total):
            raise LMInputError(f"attention_mask: expected shape ({B}, {total}) (start_pos + prefix + text), found "
                               f"{tuple(attention_mask.shape)}")
        limit = cache.max_len if cache is not None else self.cfg.max_seq_len
        if total > limit:
            raise LMInputError(f"sequence: {total} positions exceed the limit {limit} (LMConfig.max_seq_len or cache)")
        if cache is not None and cache.batch != B:
            raise LMInputError(f"cache: built for batch {cache.batch}, found batch {B}")
        if start_pos and cache is None:
            raise LMInputError("start_pos: a non-zero start_pos needs the cache holding the earlier positions")
        return B, P, T

    # ---- forward ------------------------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor | None, prefix_embeds: torch.Tensor | None) -> torch.Tensor:
        parts = []
        if prefix_embeds is not None:
            parts.append(prefix_embeds.to(self.tok_embeddings.weight.dtype))
        if input_ids is not None:
            parts.append(self.tok_embeddings(input_ids))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (B, P+T, dim)

    def hidden_states(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        """Run the blocks on embeddings x (B, L, dim) at positions start_pos.. ; returns final-norm (B, L, dim).

        `attention_mask` (B, start_pos+L) covers every position so far (True = real token).
        """
        B, L, _ = x.shape
        total = start_pos + L
        if attention_mask is None:
            positions = torch.arange(start_pos, total, device=x.device).expand(B, L)
            token_mask = None
            mask = None if start_pos == 0 else torch.ones(L, total, dtype=torch.bool, device=x.device).tril(start_pos)
        else:
            attention_mask = attention_mask.to(device=x.device, dtype=torch.bool)
            # positions count real tokens, so left padding does not shift a prompt's positions
            positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, start_pos:]
            token_mask = attention_mask[:, start_pos:]
            causal = torch.ones(L, total, dtype=torch.bool, device=x.device).tril(start_pos)  # (L, total)
            mask = causal & attention_mask[:, None, :]  # (B, L, total)
            # a padding query that sees no real key attends to itself (its output is never used; avoids NaN)
            own = torch.zeros(L, total, dtype=torch.bool, device=x.device)
            own[torch.arange(L), torch.arange(start_pos, total)] = True
            mask = (mask | own).unsqueeze(1)  # (B, 1, L, total)
        if mask is not None and mask.dim() == 2:
            mask = mask[None, None]
        cos = self.rope_cos[positions].unsqueeze(1)  # (B, 1, L, hd/2)
        sin = self.rope_sin[positions].unsqueeze(1)
        for block in self.layers:
            x = block(x, cos, sin, mask, cache, start_pos, token_mask)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor | None = None, *, prefix_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: KVCache | None = None, start_pos: int = 0) -> LMOutput:
        B, P, T = self._check_inputs(input_ids, prefix_embeds, attention_mask, cache, start_pos)
        hidden = self.hidden_states(self.embed(input_ids, prefix_embeds), attention_mask, cache, start_pos)
        logits = self.output(hidden)  # (B, P+T, vocab)
        aux = self.aux_loss()
        loss = None
        if labels is not None:
            if input_ids is None or labels.shape != input_ids.shape:
                expected = tuple(input_ids.shape) if input_ids is not None else "that of input_ids (none given)"
                raise LMInputError(f"labels: expected shape (B, T) = {expected}, found {tuple(labels.shape)}")
            # position i predicts token i+1; the last prefix position predicts the first text token
            targets = torch.cat([labels.new_full((B, P), -100), labels], dim=1)[:, 1:]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-100)
            if aux is not None:
                loss = loss + aux
        return LMOutput(logits=logits, loss=loss, aux_loss=aux, hidden=hidden)

    def aux_loss(self) -> torch.Tensor | None:
        losses = [m.aux_loss for m in self.moe_layers if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    # ---- routing statistics and balancing -----------------------------------------------------------------------

    def expert_load(self) -> list[torch.Tensor]:
        """Tokens routed to each expert (E,) per MoE layer in the last forward (padding excluded)."""
        return [m.last_load.clone() for m in self.moe_layers]

    def activated_param_fraction(self) -> float:
        """Parameters one token uses / all parameters (routed experts count top_k / n_routed_experts)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = sum(t - a for a, t in (m.activated_params() for m in self.moe_layers))
        return (total - inactive) / total

    @torch.no_grad()
    def update_router_bias(self) -> None:
        for m in self.moe_layers:
            m.update_bias()

    # ---- generation and scoring ---------------------------------------------------------------------------------

    def make_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        ref = self.tok_embeddings.weight
        return KVCache(self.cfg.n_layers, batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim,
                       device=device or ref.device, dtype=dtype or ref.dtype)

    def _prefill(self, input_ids, prefix_embeds, attention_mask, extra: int):
        """Validate, build a cache for `extra` more positions, run the prompt; return (cache, mask, last logits)."""
        B, P, T = self._check_inputs(input_ids, prefix_embeds, attention_mask, None, 0)
        L = P + T
        if L == 0:
            raise LMInputError("prompt: expected at least one prefix or text position, found none")
        if L + extra > self.cfg.max_seq_len:
            raise LMInputError(f"prompt: {L} positions + {extra} new exceed LMConfig.max_seq_len="
                               f"{self.cfg.max_seq_len}")
        x = self.embed(input_ids, prefix_embeds)
        cache = self.make_cache(B, L + extra, device=x.device)
        mask = torch.ones(B, L + extra, dtype=torch.bool, device=x.device)
        if attention_mask is not None:
            mask[:, :L] = attention_mask.to(device=x.device, dtype=torch.bool)
        hidden = self.hidden_states(x, mask[:, :L] if attention_mask is not None else None, cache, 0)
        return cache, mask, self.output(hidden[:, -1]).float(), L  # (B, vocab)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | None, *, prefix_embeds: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, stop_tokens=(), pad_id: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """New tokens (B, n <= max_new_tokens): greedy at temperature 0, else temperature + nucleus (top_p) sampling.

        A row that emits a stop token is padded with pad_id afterwards; generation ends when every row stopped.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise LMInputError(f"max_new_tokens: expected a positive integer, found {max_new_tokens!r}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise LMInputError(f"temperature/top_p: expected temperature >= 0 and 0 < top_p <= 1, found "
                               f"{temperature}, {top_p}")
        cache, mask, logits, pos = self._prefill(input_ids, prefix_embeds, attention_mask, max_new_tokens)
        padded = attention_mask is not None
        B = logits.size(0)
        stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=logits.device)
        done = torch.zeros(B, dtype=torch.bool, device=logits.device)
        out = []
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_p, generator)  # (B,)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            out.append(token)
            if stops.numel():
                done |= torch.isin(token, stops)
                if bool(done.all()):
                    break
            if step == max_new_tokens - 1:
                break
            x = self.tok_embeddings(token[:, None])  # (B, 1, dim)
            hidden = self.hidden_states(x, mask[:, :pos + 1] if padded else None, cache, pos)
            logits = self.output(hidden[:, -1]).float()
            pos += 1
        return torch.stack(out, dim=1)

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor | None, candidates: list[list[int]], *,
              prefix_embeds: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_candidates) summed log-likelihood of each candidate token list continuing each prompt.

        The prompt runs once; its cache is repeated per candidate, and all candidates run as one right-padded batch.
        """
        if (not isinstance(candidates, (list, tuple)) or not candidates
                or any(not isinstance(c, (list, tuple)) or not c for c in candidates)):
            raise LMInputError("candidates: expected a non-empty list of non-empty token id lists")
        flat = [t for c in candidates for t in c]
        if any(not isinstance(t, int) or not 0 <= t < self.cfg.vocab_size for t in flat):
            raise LMInputError(f"candidates: expected integer token ids in [0, {self.cfg.vocab_size})")
        n, longest = len(candidates), max(len(c) for c in candidates)
        cache, mask, logits, L = self._prefill(input_ids, prefix_embeds, attention_mask, longest)
        B = logits.size(0)
        device = logits.device
        cand = torch.zeros(n, longest, dtype=torch.long, device=device)
        valid = torch.zeros(n, longest, dtype=torch.bool, device=device)
        for i, c in enumerate(candidates):
            cand[i, :len(c)] = torch.tensor(c, device=device)
            valid[i, :len(c)] = True
        first = logits.log_softmax(-1)[:, cand[:, 0]]  # (B, n): log p(c_0 | prompt)
        total = first
        if longest > 1:
            cache = cache.repeat_interleave(n)
            tokens = cand[:, :-1].repeat(B, 1)  # (B*n, longest-1): rows b*n+i feed candidate i
            full_mask = mask.repeat_interleave(n, dim=0)[:, :L + longest - 1]
            hidden = self.hidden_states(self.tok_embeddings(tokens), full_mask if attention_mask is not None else None,
                                        cache, L)
            logp = self.output(hidden).float().log_softmax(-1)  # (B*n, longest-1, vocab)
            nxt = cand[:, 1:].repeat(B, 1)
            picked = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1) * valid[:, 1:].repeat(B, 1)
            total = total + picked.sum(-1).view(B, n)
        return total


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, vocab) fp32 logits -> (B,) next tokens: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = (logits / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
