"""Volume (3D) encoders for CT: (B, C, D, H, W) voxels plus an optional per-slice mask -> tokens (B, N, dim) + mask.

`window3d`: 3D patch embedding, then transformer blocks whose attention is local inside 3D windows of patches
(Swin-style, every other block shifted by half a window so information crosses window borders) plus a few global
tokens that attend to every patch and are attended by every patch (Longformer/BigBird-style). Each patch attends to
at most `window` + `n_global` keys and each global token to N + `n_global`, so the cost grows linearly with the
number of patches N instead of N^2.

`slice2d`: a timm 2D backbone per slice, then attention pooling over depth.

Variable depth: `volume_mask` (B, D) marks real slices (True). Padded slices are zeroed before the patch embedding
and patches made only of padded slices are masked out of every attention, so padding never changes the result.
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from mmcore.config import VolumeEncoderConfig


def check_volume(volume: torch.Tensor, volume_mask: torch.Tensor | None, in_chans: int) -> torch.Tensor:
    """Validate shapes; return the slice mask (B, D) bool (all True when none was given)."""
    if volume.ndim != 5 or volume.shape[1] != in_chans:
        raise ValueError(f"volume: expected shape (B, {in_chans}, D, H, W), found {tuple(volume.shape)}")
    B, _, D = volume.shape[:3]
    if volume_mask is None:
        return torch.ones(B, D, dtype=torch.bool, device=volume.device)
    if volume_mask.shape != (B, D):
        raise ValueError(f"volume_mask: expected shape (B, D) = ({B}, {D}) to match the volume, "
                         f"found {tuple(volume_mask.shape)}")
    return volume_mask.to(device=volume.device, dtype=torch.bool)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


def window_partition(x: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """(B, Z, Y, X, C) with Z, Y, X multiples of the window -> (B * n_windows, wz * wy * wx, C)."""
    B, Z, Y, X, C = x.shape
    wz, wy, wx = window
    x = x.view(B, Z // wz, wz, Y // wy, wy, X // wx, wx, C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wz * wy * wx, C)


def window_merge(windows: torch.Tensor, window: tuple[int, int, int], grid: tuple[int, int, int], B: int):
    """Inverse of `window_partition`: (B * n_windows, wz * wy * wx, C) -> (B, Z, Y, X, C)."""
    wz, wy, wx = window
    Z, Y, X = grid
    C = windows.shape[-1]
    x = windows.view(B, Z // wz, Y // wy, X // wx, wz, wy, wx, C)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, Z, Y, X, C)


def effective_window(grid: tuple[int, int, int], window: tuple[int, int, int], shifted: bool):
    """Windows never exceed the grid; a shift of half a window applies only along axes the window does not cover."""
    win = tuple(min(w, g) for w, g in zip(window, grid))
    shift = tuple(w // 2 if shifted and w < g else 0 for w, g in zip(win, grid))
    return win, shift


class WindowGlobalAttention(nn.Module):
    """Multi-head attention: patches see their 3D window + the global tokens; global tokens see everything."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (..., L, C) -> (..., h, L, C/h)
        return t.unflatten(-1, (self.n_heads, -1)).transpose(-3, -2)

    def forward(self, x: torch.Tensor, g: torch.Tensor, valid: torch.Tensor, window: tuple[int, int, int],
                shift: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, Z, Y, X, C) patches, g (B, G, C) global tokens, valid (B, Z, Y, X) bool real patches."""
        B, Z, Y, X, C = x.shape
        G = g.shape[1]
        qkv_x, qkv_g = self.qkv(x), self.qkv(g)  # (B, Z, Y, X, 3C), (B, G, 3C)
        q_g, k_g, v_g = (self._heads(t) for t in qkv_g.chunk(3, dim=-1))  # (B, h, G, d)

        # Local windows: pad `shift` patches in front (the shifted partition) and up to whole windows behind;
        # padding is masked out as a key, so no window ever wraps around the volume.
        pads = [(s, (-(n + s)) % w) for n, w, s in zip((Z, Y, X), window, shift)]
        flat_pad = [p for pair in reversed(pads) for p in pair]  # F.pad lists the last dim first
        grid_p = tuple(n + a + b for n, (a, b) in zip((Z, Y, X), pads))
        xp = F.pad(qkv_x, (0, 0, *flat_pad))
        vp = F.pad(valid, flat_pad, value=False)
        win_qkv = window_partition(xp, window)  # (B*nW, w, 3C)
        win_valid = window_partition(vp.unsqueeze(-1), window).squeeze(-1)  # (B*nW, w)
        n_win = win_qkv.shape[0] // B
        q, k, v = (self._heads(t) for t in win_qkv.chunk(3, dim=-1))  # (B*nW, h, w, d)
        k = torch.cat([k, k_g.repeat_interleave(n_win, dim=0)], dim=2)  # (B*nW, h, w+G, d)
        v = torch.cat([v, v_g.repeat_interleave(n_win, dim=0)], dim=2)
        key_ok = torch.cat([win_valid, win_valid.new_ones(win_valid.shape[0], G)], dim=1)  # (B*nW, w+G)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_ok[:, None, None, :])  # (B*nW, h, w, d)
        out = window_merge(out.transpose(1, 2).flatten(2), window, grid_p, B)  # (B, Zp, Yp, Xp, C)
        (z0, _), (y0, _), (x0, _) = pads
        out_x = out[:, z0:z0 + Z, y0:y0 + Y, x0:x0 + X]  # (B, Z, Y, X, C)

        # Global tokens attend to each other and to every real patch.
        k_x, v_x = (self._heads(t.reshape(B, Z * Y * X, C)) for t in qkv_x.chunk(3, dim=-1)[1:])  # (B, h, N, d)
        key_ok_g = torch.cat([valid.new_ones(B, G), valid.reshape(B, -1)], dim=1)  # (B, G+N)
        out_g = F.scaled_dot_product_attention(q_g, torch.cat([k_g, k_x], 2), torch.cat([v_g, v_x], 2),
                                               attn_mask=key_ok_g[:, None, None, :])  # (B, h, G, d)
        return self.proj(out_x), self.proj(out_g.transpose(1, 2).flatten(2))


class WindowGlobalBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowGlobalAttention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x, g, valid, window, shift):
        dx, dg = self.attn(self.norm1(x), self.norm1(g), valid, window, shift)
        x, g = x + dx, g + dg
        return x + self.mlp(self.norm2(x)), g + self.mlp(self.norm2(g))


class WindowVolumeEncoder(nn.Module):
    """`window3d`: (B, C, D, H, W) -> tokens (B, G + N, dim) = [global tokens, patches], mask (B, G + N)."""

    def __init__(self, cfg: VolumeEncoderConfig):
        super().__init__()
        if cfg.n_global_tokens < 1:
            raise ValueError(f"VolumeEncoderConfig.n_global_tokens: window3d needs at least 1 global token (it "
                             f"carries information between windows), found {cfg.n_global_tokens}")
        self.cfg = cfg
        self.patch_size = tuple(cfg.patch_size)
        self.window = tuple(cfg.window_size)
        self.out_dim = cfg.dim
        self.patch_embed = nn.Conv3d(cfg.in_chans, cfg.dim, kernel_size=self.patch_size, stride=self.patch_size)
        # Factorised learned positions: one table per axis, summed (max_grid patches per axis).
        self.pos_z, self.pos_y, self.pos_x = (nn.Parameter(torch.randn(n, cfg.dim) * 0.02) for n in cfg.max_grid)
        self.global_tokens = nn.Parameter(torch.randn(cfg.n_global_tokens, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(WindowGlobalBlock(cfg.dim, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, volume: torch.Tensor, volume_mask: torch.Tensor | None = None):
        slice_ok = check_volume(volume, volume_mask, self.cfg.in_chans)  # (B, D)
        B, _, D, H, W = volume.shape
        pz, py, px = self.patch_size
        if H % py or W % px:
            raise ValueError(f"volume: expected H and W divisible by patch_size ({py}, {px}), found "
                             f"{tuple(volume.shape)}")
        # Zero padded slices, then pad the depth to whole patches (those slices are padding too).
        volume = volume * slice_ok[:, None, :, None, None].to(volume.dtype)
        extra = (-D) % pz
        if extra:
            volume = F.pad(volume, (0, 0, 0, 0, 0, extra))
            slice_ok = F.pad(slice_ok, (0, extra), value=False)
        x = self.patch_embed(volume).permute(0, 2, 3, 4, 1)  # (B, Z, Y, X, dim)
        Z, Y, X = x.shape[1:4]
        if any(n > m for n, m in zip((Z, Y, X), self.cfg.max_grid)):
            raise ValueError(f"VolumeEncoderConfig.max_grid: the volume {tuple(volume.shape)} makes a patch grid "
                             f"{(Z, Y, X)}, larger than max_grid={tuple(self.cfg.max_grid)}")
        x = x + self.pos_z[:Z, None, None] + self.pos_y[None, :Y, None] + self.pos_x[None, None, :X]
        valid = slice_ok.view(B, Z, pz).any(-1)[:, :, None, None].expand(B, Z, Y, X)  # (B, Z, Y, X)
        g = self.global_tokens.expand(B, -1, -1)  # (B, G, dim)
        for i, block in enumerate(self.blocks):
            window, shift = effective_window((Z, Y, X), self.window, shifted=i % 2 == 1)
            x, g = block(x, g, valid, window, shift)
        tokens = self.norm(torch.cat([g, x.reshape(B, Z * Y * X, -1)], dim=1))  # (B, G+N, dim)
        present = valid.reshape(B, -1).any(-1, keepdim=True)  # (B, 1): a volume with no real slice is absent
        mask = torch.cat([present.expand(B, g.shape[1]), valid.reshape(B, -1)], dim=1)  # (B, G+N)
        return tokens * mask.unsqueeze(-1), mask


class SliceVolumeEncoder(nn.Module):
    """`slice2d`: timm backbone per real slice -> (B, D, F) -> project + depth position -> attention pooling.

    Output tokens (B, G + D, dim) = [G pooled summaries, one token per slice], mask (B, G + D)."""

    def __init__(self, cfg: VolumeEncoderConfig, backbone: nn.Module | None = None):
        super().__init__()
        from mmcore.encoders.image import create_backbone

        self.cfg = cfg
        self.out_dim = cfg.dim
        self.backbone = backbone or create_backbone(cfg.slice_model_name, pretrained=False, checkpoint_path=None,
                                                    in_chans=cfg.in_chans)
        self.proj = nn.Linear(int(self.backbone.num_features), cfg.dim)
        self.max_slices = cfg.max_grid[0] * cfg.patch_size[0]  # the depth range window3d covers, in slices
        self.pos_depth = nn.Parameter(torch.randn(self.max_slices, cfg.dim) * 0.02)
        self.pool_queries = nn.Parameter(torch.randn(max(cfg.n_global_tokens, 1), cfg.dim) * 0.02)
        self.pool = nn.MultiheadAttention(cfg.dim, cfg.n_heads, batch_first=True)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, volume: torch.Tensor, volume_mask: torch.Tensor | None = None):
        slice_ok = check_volume(volume, volume_mask, self.cfg.in_chans)  # (B, D)
        B, C, D, H, W = volume.shape
        if D > self.max_slices:
            raise ValueError(f"VolumeEncoderConfig.max_grid: {D} slices exceed the {self.max_slices} covered by "
                             f"max_grid[0] * patch_size[0]")
        slices = volume.transpose(1, 2).reshape(B * D, C, H, W)  # (B*D, C, H, W)
        real = slice_ok.reshape(-1).nonzero().squeeze(1)
        feats = slices.new_zeros(B * D, self.proj.in_features)
        if real.numel():  # padded slices never reach the backbone (nor its batch-norm statistics)
            feats = feats.index_copy(0, real, self.backbone(slices[real]).to(feats.dtype))
        x = self.proj(feats.view(B, D, -1)) + self.pos_depth[:D]  # (B, D, dim)
        # A volume with no real slice would leave the pooling no key; let it see everything, then mask its output.
        ignore = ~slice_ok & slice_ok.any(-1, keepdim=True)
        q = self.pool_queries.expand(B, -1, -1)  # (B, G, dim)
        pooled, _ = self.pool(q, x, x, key_padding_mask=ignore, need_weights=False)  # (B, G, dim)
        tokens = self.norm(torch.cat([pooled, x], dim=1))  # (B, G+D, dim)
        present = slice_ok.any(-1, keepdim=True)
        mask = torch.cat([present.expand(B, q.shape[1]), slice_ok], dim=1)
        return tokens * mask.unsqueeze(-1), mask


def build_volume_encoder(cfg: VolumeEncoderConfig) -> nn.Module:
    cfg.validate()
    return WindowVolumeEncoder(cfg) if cfg.variant == "window3d" else SliceVolumeEncoder(cfg)
