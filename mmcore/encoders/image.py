"""Image encoder: any timm model by name, its feature map flattened into a token sequence (B, N, C).

Pretrained weights come only from `checkpoint_path` or from a file already in the local Hugging Face / torch hub
cache. Nothing is ever downloaded: asking for pretrained weights that are not on disk raises an error saying where
to put them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from mmcore.config import ImageEncoderConfig


class PretrainedWeightsMissing(FileNotFoundError):
    """Pretrained weights were asked for but are not on this machine (we never download them)."""


def _cached_weights(model_name: str) -> Path | None:
    """The local file holding timm's default pretrained weights for `model_name`, or None when absent."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin", getattr(cfg, "hf_hub_filename", None)):
            if filename:
                found = try_to_load_from_cache(cfg.hf_hub_id, filename)
                if isinstance(found, str) and os.path.isfile(found):
                    return Path(found)
    if cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if candidate.is_file():
            return candidate
    return None


def _weights_location_hint(model_name: str) -> str:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name)
    places = ["set ImageEncoderConfig.checkpoint_path to a local .safetensors/.pth file"]
    if cfg is not None and cfg.hf_hub_id:
        places.append(f"or place the Hugging Face repo {cfg.hf_hub_id!r} in the HF cache (HF_HOME)")
    if cfg is not None and cfg.url:
        places.append(f"or put {os.path.basename(cfg.url)} in {Path(torch.hub.get_dir()) / 'checkpoints'}")
    return "; ".join(places)


def create_backbone(model_name: str, *, pretrained: bool, checkpoint_path: str | None, in_chans: int,
                    img_size: int | None = None, timm_kwargs: dict | None = None) -> nn.Module:
    """A headless timm model (`num_classes=0`) whose weights, when asked for, come from disk only."""
    import timm

    if not timm.is_model(model_name):
        raise ValueError(f"ImageEncoderConfig.model_name: {model_name!r} is not a timm model name "
                         f"(see timm.list_models())")
    kwargs = dict(num_classes=0, in_chans=in_chans, **(timm_kwargs or {}))
    weights: Path | None = None
    if checkpoint_path:
        weights = Path(checkpoint_path)
        if not weights.is_file():
            raise PretrainedWeightsMissing(f"ImageEncoderConfig.checkpoint_path: {checkpoint_path} does not exist")
    elif pretrained:
        weights = _cached_weights(model_name)
        if weights is None:
            raise PretrainedWeightsMissing(f"pretrained weights for timm model {model_name!r} are not on this machine "
                                           f"and are never downloaded: {_weights_location_hint(model_name)}")
    if weights is not None:
        # timm's own loader adapts the classifier (dropped, num_classes=0) and the stem (in_chans != 3).
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    if img_size is not None:
        try:  # transformers need the input size for their position embeddings; CNNs take no such argument
            return timm.create_model(model_name, img_size=img_size, **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
    return timm.create_model(model_name, **kwargs)


def features_to_tokens(features: torch.Tensor) -> torch.Tensor:
    """timm `forward_features` output -> (B, N, C): CNN maps (B, C, H, W) are flattened, ViT tokens pass through."""
    if features.ndim == 4:
        return features.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
    if features.ndim == 3:
        return features  # already (B, N, C)
    raise ValueError(f"timm forward_features returned shape {tuple(features.shape)}; expected (B, C, H, W) or "
                     f"(B, N, C)")


class ImageEncoder(nn.Module):
    """(B, in_chans, H, W) float images -> (B, N, out_dim) tokens."""

    def __init__(self, cfg: ImageEncoderConfig, load_weights: bool = True):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        # load_weights=False: the architecture only, its weights come from an mmcore checkpoint
        self.backbone = create_backbone(cfg.model_name, pretrained=cfg.pretrained and load_weights,
                                        checkpoint_path=cfg.checkpoint_path if load_weights else None,
                                        in_chans=cfg.in_chans, img_size=cfg.img_size, timm_kwargs=cfg.timm_kwargs)
        self.out_dim = int(self.backbone.num_features)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 4 or image.shape[1] != self.cfg.in_chans:
            raise ValueError(f"image: expected shape (B, {self.cfg.in_chans}, H, W), found {tuple(image.shape)}")
        return features_to_tokens(self.backbone.forward_features(image))  # (B, N, C)
