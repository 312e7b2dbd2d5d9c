"""One dataclass per component, named presets, JSON round-trip.

Every config validates itself (`validate()`), raising `ValueError` that names the offending field, and round-trips
through `to_dict()` / `from_dict()` / JSON, so a checkpoint's `config.json` rebuilds exactly the same model.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigBase:
    """JSON round-trip and validation shared by every component config."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object, found {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}; expected some of {sorted(names)}")
        kwargs = {}
        for key, value in data.items():
            sub = _config_class(hints[key])
            if sub is not None and value is not None:
                value = sub.from_dict(value)
            elif isinstance(value, list) and "tuple" in str(hints[key]):
                value = tuple(value)
            kwargs[key] = value
        obj = cls(**kwargs)
        obj.validate()
        return obj

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path):
        path = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        text = path.read_text() if path is not None else str(text_or_path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path or 'config'}: not valid JSON ({exc})") from exc
        return cls.from_dict(data)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ConfigBase):
                value.validate()


def _config_class(hint) -> type[ConfigBase] | None:
    """The ConfigBase subclass inside a hint like `MoEConfig` or `MoEConfig | None`."""
    candidates = typing.get_args(hint) or (hint,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, ConfigBase):
            return c
    return None


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name}: expected a positive integer, found {value!r}")


@dataclass
class MoEConfig(ConfigBase):
    """DeepSeek-V3-style MoE feed-forward: shared experts plus fine-grained routed SwiGLU experts."""

    n_routed_experts: int = 16
    n_shared_experts: int = 1
    top_k: int = 4
    expert_hidden: int = 256  # each expert's SwiGLU inner width (DeepSeek's moe_inter_dim)
    n_groups: int = 1  # expert groups for group-limited routing
    topk_groups: int = 1  # groups kept per token
    score_func: str = "softmax"  # "softmax" or "sigmoid"
    normalize_topk: bool | None = None  # None: renormalise for sigmoid only (as DeepSeek-V3)
    route_scale: float = 1.0
    bias_update_gamma: float = 0.001  # aux-loss-free balancing step; 0 disables
    aux_loss_alpha: float = 0.0  # optional sequence-wise balance loss weight (DeepSeek uses 1e-4)
    dispatch: str = "auto"  # "auto", "grouped_mm", "loop", "gather"

    def validate(self) -> None:
        _positive(self, "n_routed_experts", "top_k", "expert_hidden", "n_groups", "topk_groups")
        if self.n_shared_experts < 0:
            raise ValueError(f"MoEConfig.n_shared_experts: expected >= 0, found {self.n_shared_experts}")
        if self.top_k > self.n_routed_experts:
            raise ValueError(f"MoEConfig.top_k: {self.top_k} exceeds n_routed_experts={self.n_routed_experts}")
        if self.n_routed_experts % self.n_groups:
            raise ValueError(f"MoEConfig.n_groups: {self.n_groups} does not divide "
                             f"n_routed_experts={self.n_routed_experts}")
        if self.topk_groups > self.n_groups:
            raise ValueError(f"MoEConfig.topk_groups: {self.topk_groups} exceeds n_groups={self.n_groups}")
        if self.top_k > self.topk_groups * (self.n_routed_experts // self.n_groups):
            raise ValueError(f"MoEConfig.top_k: {self.top_k} exceeds the experts inside topk_groups="
                             f"{self.topk_groups} groups of {self.n_routed_experts // self.n_groups}")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"MoEConfig.score_func: expected 'softmax' or 'sigmoid', found {self.score_func!r}")
        if self.dispatch not in ("auto", "grouped_mm", "loop", "gather"):
            raise ValueError(f"MoEConfig.dispatch: expected auto, grouped_mm, loop or gather, found {self.dispatch!r}")


@dataclass
class LMConfig(ConfigBase):
    """Decoder-only language core: RMSNorm, RoPE, grouped-query attention, dense then MoE feed-forward blocks."""

    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    n_dense_layers: int = 1  # the first blocks use a dense SwiGLU, the rest MoE
    dense_hidden: int = 768
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    moe: MoEConfig | None = field(default_factory=MoEConfig)  # None: every block dense

    def validate(self) -> None:
        super().validate()
        _positive(self, "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "dense_hidden", "max_seq_len")
        if self.dim % self.n_heads:
            raise ValueError(f"LMConfig.dim: {self.dim} is not divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"LMConfig.n_heads: head dim {self.dim // self.n_heads} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LMConfig.n_kv_heads: {self.n_kv_heads} does not divide n_heads={self.n_heads}")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ValueError(f"LMConfig.n_dense_layers: expected 0..{self.n_layers}, found {self.n_dense_layers}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class ImageEncoderConfig(ConfigBase):
    """Any timm model by name, turned into a token sequence (B, N, C)."""

    model_name: str = "resnet18"
    pretrained: bool = False  # weights only from `checkpoint_path` or the local timm cache, never fetched
    checkpoint_path: str | None = None
    in_chans: int = 3
    img_size: int = 64
    timm_kwargs: dict = field(default_factory=dict)

    def validate(self) -> None:
        _positive(self, "in_chans", "img_size")
        if not self.model_name:
            raise ValueError("ImageEncoderConfig.model_name: expected a timm model name, found an empty string")


@dataclass
class VolumeEncoderConfig(ConfigBase):
    """3D CT encoder: `window3d` (3D patches, local window + global-token attention) or `slice2d` (timm per slice)."""

    variant: str = "window3d"
    in_chans: int = 1
    dim: int = 192
    depth: int = 4
    n_heads: int = 6
    patch_size: tuple[int, int, int] = (4, 8, 8)  # voxels per patch (z, y, x)
    window_size: tuple[int, int, int] = (2, 4, 4)  # patches per local attention window (z, y, x)
    n_global_tokens: int = 4  # tokens that attend to and are attended by every patch
    max_grid: tuple[int, int, int] = (64, 64, 64)  # largest patch grid the position embeddings cover
    mlp_ratio: float = 4.0
    slice_model_name: str = "resnet18"  # slice2d only: the timm backbone run per slice

    def validate(self) -> None:
        _positive(self, "in_chans", "dim", "depth", "n_heads")
        if self.variant not in ("window3d", "slice2d"):
            raise ValueError(f"VolumeEncoderConfig.variant: expected 'window3d' or 'slice2d', found {self.variant!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"VolumeEncoderConfig.dim: {self.dim} is not divisible by n_heads={self.n_heads}")
        for name in ("patch_size", "window_size", "max_grid"):
            value = tuple(getattr(self, name))
            if len(value) != 3 or any(not isinstance(v, int) or v <= 0 for v in value):
                raise ValueError(f"VolumeEncoderConfig.{name}: expected three positive integers, found {value!r}")


@dataclass
class AudioEncoderConfig(ConfigBase):
    """Audio tokens: precomputed Whisper encoder features (`features`) or a Whisper encoder loaded here (`whisper`)."""

    source: str = "features"
    feature_dim: int = 512  # Whisper base encoder width
    whisper_checkpoint: str | None = None  # openai-whisper .pt file, for source="whisper"
    freeze: bool = True
    pool_stride: int = 4  # average-pool consecutive frames (20 ms each) before the bridge
    whisper_dims: dict | None = None  # source="whisper": the checkpoint's ModelDimensions, recorded when it is read

    def validate(self) -> None:
        _positive(self, "feature_dim", "pool_stride")
        if self.source not in ("features", "whisper"):
            raise ValueError(f"AudioEncoderConfig.source: expected 'features' or 'whisper', found {self.source!r}")


@dataclass
class BridgeConfig(ConfigBase):
    """Learned queries cross-attend over every present modality's tokens; output (B, n_queries, lm dim)."""

    dim: int = 256
    n_queries: int = 32
    n_layers: int = 2
    n_heads: int = 8
    max_tokens_per_modality: int = 4096  # position embeddings per modality
    mlp_ratio: float = 4.0

    def validate(self) -> None:
        _positive(self, "dim", "n_queries", "n_layers", "n_heads", "max_tokens_per_modality")
        if self.dim % self.n_heads:
            raise ValueError(f"BridgeConfig.dim: {self.dim} is not divisible by n_heads={self.n_heads}")


@dataclass
class ModelConfig(ConfigBase):
    """MultimodalModel = optional encoders + bridge + language core."""

    lm: LMConfig = field(default_factory=LMConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    image: ImageEncoderConfig | None = None
    volume: VolumeEncoderConfig | None = None
    audio: AudioEncoderConfig | None = None

    def validate(self) -> None:
        super().validate()


def _tiny() -> ModelConfig:
    return ModelConfig(
        lm=LMConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, n_dense_layers=1, dense_hidden=128,
                    max_seq_len=256, moe=MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=32,
                                                   n_groups=2, topk_groups=1)),
        bridge=BridgeConfig(dim=64, n_queries=8, n_layers=1, n_heads=4),
        image=ImageEncoderConfig(model_name="resnet18", img_size=32),
        volume=VolumeEncoderConfig(dim=48, depth=2, n_heads=4, patch_size=(4, 8, 8), window_size=(2, 2, 2),
                                   n_global_tokens=2, max_grid=(16, 16, 16)),
        audio=AudioEncoderConfig(feature_dim=64, pool_stride=2),
    )


def _small() -> ModelConfig:
    return ModelConfig(
        lm=LMConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, n_dense_layers=1, dense_hidden=768,
                    max_seq_len=1024, moe=MoEConfig(n_routed_experts=16, n_shared_experts=1, top_k=4,
                                                    expert_hidden=128, n_groups=4, topk_groups=2)),
        bridge=BridgeConfig(dim=256, n_queries=32, n_layers=2, n_heads=8),
        image=ImageEncoderConfig(model_name="resnet18", img_size=64),
        volume=VolumeEncoderConfig(),
        audio=AudioEncoderConfig(feature_dim=512),
    )


def _base() -> ModelConfig:
    return ModelConfig(
        lm=LMConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, n_dense_layers=1,
                    dense_hidden=2048, max_seq_len=2048, moe=MoEConfig(n_routed_experts=64, n_shared_experts=2, top_k=6,
                                                                       expert_hidden=384, n_groups=8, topk_groups=3)),
        bridge=BridgeConfig(dim=768, n_queries=64, n_layers=4, n_heads=12),
        image=ImageEncoderConfig(model_name="resnet50", img_size=224),
        volume=VolumeEncoderConfig(dim=384, depth=8, n_heads=6, patch_size=(4, 16, 16), window_size=(2, 4, 4),
                                   n_global_tokens=8),
        audio=AudioEncoderConfig(feature_dim=512),
    )


PRESETS = {"tiny": _tiny, "small": _small, "base": _base}


def preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for a named preset: `tiny` (tests), `small` (shipped demo weights), `base`."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown name {name!r}; expected one of {sorted(PRESETS)}")
    config = PRESETS[name]()
    config.validate()
    return config
