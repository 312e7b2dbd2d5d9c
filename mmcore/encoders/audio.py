"""Audio encoder: Whisper encoder features as tokens, pooled in time before the bridge.

`source="features"`: the input is Whisper encoder output computed elsewhere, (B, T, feature_dim), one frame per
20 ms (1500 frames per 30 s window). `source="whisper"`: the input is a log-mel spectrogram (B, n_mels, frames) and
the Whisper encoder runs here, its architecture rebuilt and its weights read from an openai-whisper checkpoint file
(`{"dims": {...}, "model_state_dict": {...}}`, as `whisper.load_model` reads). The state-dict names match
openai-whisper's `AudioEncoder`, so its weights load unchanged. Frozen by default.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmcore.config import AudioEncoderConfig

WHISPER_DIM_FIELDS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer")


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed sinusoidal positions (length, channels)."""
    log_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(channels // 2))
    scaled = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


class LayerNorm(nn.LayerNorm):
    """Whisper normalises in fp32 whatever the compute dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class WhisperAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        q, k, v = (t.unflatten(-1, (self.n_head, -1)).transpose(1, 2) for t in
                   (self.query(x), self.key(x), self.value(x)))  # (B, h, T, d)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class WhisperBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = WhisperAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = LayerNorm(n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class WhisperAudioEncoder(nn.Module):
    """openai-whisper's AudioEncoder: 2 convolutions (the second halves time) + transformer blocks + ln_post."""

    def __init__(self, n_mels: int, n_audio_ctx: int, n_audio_state: int, n_audio_head: int, n_audio_layer: int):
        super().__init__()
        self.n_mels, self.n_ctx = n_mels, n_audio_ctx
        self.conv1 = nn.Conv1d(n_mels, n_audio_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_audio_state, n_audio_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_audio_ctx, n_audio_state))
        self.blocks = nn.ModuleList(WhisperBlock(n_audio_state, n_audio_head) for _ in range(n_audio_layer))
        self.ln_post = LayerNorm(n_audio_state)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, n_mels, frames), frames even and at most 2 * n_audio_ctx (3000 = 30 s) -> (B, frames/2, C)."""
        if mel.ndim != 3 or mel.shape[1] != self.n_mels:
            raise ValueError(f"audio: expected a log-mel spectrogram (B, {self.n_mels}, frames), "
                             f"found {tuple(mel.shape)}")
        if mel.shape[2] % 2 or mel.shape[2] > 2 * self.n_ctx:
            raise ValueError(f"audio: expected an even number of mel frames <= {2 * self.n_ctx}, "
                             f"found {mel.shape[2]}")
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T, C), T = frames / 2
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


def read_whisper_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(dims, encoder state dict without the `encoder.` prefix) from an openai-whisper checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"AudioEncoderConfig.whisper_checkpoint: {path} does not exist (an openai-whisper "
                                f".pt file such as base.pt from ~/.cache/whisper)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"AudioEncoderConfig.whisper_checkpoint: {path} is not a readable torch checkpoint "
                         f"({exc})") from exc
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"AudioEncoderConfig.whisper_checkpoint: {path} is not in openai-whisper format; expected "
                         f"keys 'dims' and 'model_state_dict', found {found}")
    dims = {k: int(checkpoint["dims"][k]) for k in WHISPER_DIM_FIELDS if k in checkpoint["dims"]}
    missing = [k for k in WHISPER_DIM_FIELDS if k not in dims]
    if missing:
        raise ValueError(f"AudioEncoderConfig.whisper_checkpoint: {path} dims lack {missing}")
    state = {k[len("encoder."):]: v.float() for k, v in checkpoint["model_state_dict"].items()
             if k.startswith("encoder.")}
    return dims, state


def pool_frames(x: torch.Tensor, mask: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average each run of `stride` frames over its real frames: (B, T, C), (B, T) -> (B, ceil(T/s), C), mask."""
    if stride == 1:
        return x * mask.unsqueeze(-1), mask
    extra = (-x.shape[1]) % stride
    x = F.pad(x * mask.unsqueeze(-1).to(x.dtype), (0, 0, 0, extra))
    m = F.pad(mask, (0, extra), value=False)
    B, T, C = x.shape
    total = x.view(B, T // stride, stride, C).sum(2)
    count = m.view(B, T // stride, stride).sum(2, keepdim=True)
    return total / count.clamp(min=1).to(x.dtype), count.squeeze(-1) > 0


class AudioEncoder(nn.Module):
    """Audio -> tokens (B, ceil(T / pool_stride), feature_dim) + mask."""

    def __init__(self, cfg: AudioEncoderConfig, load_weights: bool = True):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.out_dim = cfg.feature_dim
        self.whisper: WhisperAudioEncoder | None = None
        if cfg.source == "whisper":
            state = None
            if load_weights or cfg.whisper_dims is None:
                if not cfg.whisper_checkpoint:
                    raise ValueError("AudioEncoderConfig.whisper_checkpoint: source='whisper' needs the path of an "
                                     "openai-whisper checkpoint file")
                cfg.whisper_dims, state = read_whisper_checkpoint(cfg.whisper_checkpoint)
            dims = cfg.whisper_dims
            if dims["n_audio_state"] != cfg.feature_dim:
                raise ValueError(f"AudioEncoderConfig.feature_dim: {cfg.feature_dim} does not match the Whisper "
                                 f"encoder width n_audio_state={dims['n_audio_state']}; set feature_dim to it")
            self.whisper = WhisperAudioEncoder(**{k: dims[k] for k in WHISPER_DIM_FIELDS})
            if state is not None:
                self.whisper.load_state_dict(state, strict=True)
            if cfg.freeze:
                self.whisper.requires_grad_(False)

    def forward(self, audio: torch.Tensor, audio_mask: torch.Tensor | None = None):
        if self.whisper is not None:
            frames = audio.shape[-1]
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze):
                x = self.whisper(audio)  # (B, frames/2, C)
            if audio_mask is not None:
                if audio_mask.shape != (audio.shape[0], frames):
                    raise ValueError(f"audio_mask: expected shape (B, frames) = ({audio.shape[0]}, {frames}), "
                                     f"found {tuple(audio_mask.shape)}")
                audio_mask = audio_mask.view(audio.shape[0], -1, 2).any(-1)  # the second conv halves time
        else:
            if audio.ndim != 3 or audio.shape[2] != self.cfg.feature_dim:
                raise ValueError(f"audio: expected Whisper encoder features (B, T, {self.cfg.feature_dim}), "
                                 f"found {tuple(audio.shape)}")
            x = audio
        B, T = x.shape[:2]
        if audio_mask is None:
            audio_mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
        elif audio_mask.shape != (B, T):
            raise ValueError(f"audio_mask: expected shape (B, T) = ({B}, {T}), found {tuple(audio_mask.shape)}")
        return pool_frames(x, audio_mask.to(device=x.device, dtype=torch.bool), self.cfg.pool_stride)
