"""MultimodalModel = optional encoders (image, volume, audio) + cross-modal bridge + MoE language core.

Inputs are a dict holding any subset of:
  "image"  (B, C, H, W) float           "image_mask"  (B,) bool, True = this sample has an image
  "volume" (B, 1, D, H, W) float        "volume_mask" (B, D) bool, True = a real slice (variable depth)
  "audio"  (B, T_a, feature_dim) float  "audio_mask"  (B, T_a) bool, True = a real frame
(for an audio encoder with source="whisper", "audio" is the log-mel spectrogram (B, n_mels, frames) and
"audio_mask" is (B, frames)). A missing modality is simply absent; a sample whose mask is all False lacks it.
The bridge turns the modality tokens into a prefix (B, n_queries, lm.dim) placed in front of the text.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from mmcore.bridge import MODALITIES, CrossModalBridge
from mmcore.config import ModelConfig
from mmcore.lm import LanguageModel, LMOutput

INPUT_KEYS = tuple(k for m in MODALITIES for k in (m, f"{m}_mask"))


class MultimodalModel(nn.Module):
    def __init__(self, cfg: ModelConfig, *, load_pretrained: bool = True):
        """`load_pretrained=False` builds the architecture only (as `mmcore.load` does before reading weights)."""
        super().__init__()
        from mmcore.encoders.audio import AudioEncoder
        from mmcore.encoders.image import ImageEncoder
        from mmcore.encoders.volume import build_volume_encoder

        if not isinstance(cfg, ModelConfig):
            raise ValueError(f"MultimodalModel: expected a ModelConfig, found {type(cfg).__name__}")
        cfg.validate()
        self.cfg = cfg
        self.encoders = nn.ModuleDict()
        if cfg.image is not None:
            self.encoders["image"] = ImageEncoder(cfg.image, load_weights=load_pretrained)
        if cfg.volume is not None:
            self.encoders["volume"] = build_volume_encoder(cfg.volume)
        if cfg.audio is not None:
            self.encoders["audio"] = AudioEncoder(cfg.audio, load_weights=load_pretrained)
        dims = {name: enc.out_dim for name, enc in self.encoders.items()}
        self.bridge = CrossModalBridge(cfg.bridge, dims, cfg.lm.dim) if dims else None
        self.lm = LanguageModel(cfg.lm)
        self.tokenizer = None  # mmcore.tokenizer.Tokenizer, saved beside the weights
        self.extra_config: dict = {}  # downstream keys that round-trip through config.json
        self.extra_tensors: dict[str, torch.Tensor] = {}  # downstream tensors stored beside the weights
        self.card: dict = {}  # what card.json said when this model was loaded

    @property
    def device(self) -> torch.device:
        return self.lm.tok_embeddings.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- encoders + bridge ----------------------------------------------------------------------------------------

    def modality_tokens(self, inputs: dict | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{modality: (tokens (B, N, C), mask (B, N))} for every modality present in `inputs`."""
        inputs = inputs or {}
        if not isinstance(inputs, dict):
            raise ValueError(f"inputs: expected a dict with some of {list(INPUT_KEYS)}, found {type(inputs).__name__}")
        unknown = set(inputs) - set(INPUT_KEYS)
        if unknown:
            raise ValueError(f"inputs: unknown key(s) {sorted(unknown)}; expected some of {list(INPUT_KEYS)}")
        out = {}
        for name in MODALITIES:
            x, mask = inputs.get(name), inputs.get(f"{name}_mask")
            if x is None:
                if mask is not None:
                    raise ValueError(f"inputs: {name}_mask given without {name}")
                continue
            if name not in self.encoders:
                raise ValueError(f"inputs: {name!r} given but this model has no {name} encoder "
                                 f"(ModelConfig.{name} is None)")
            if not torch.is_tensor(x) or not x.is_floating_point():
                raise ValueError(f"inputs[{name!r}]: expected a float tensor, found "
                                 f"{getattr(x, 'dtype', type(x).__name__)}")
            x = x.to(self.device)
            mask = None if mask is None else torch.as_tensor(mask, device=self.device).bool()
            if name == "image":
                tokens = self.encoders["image"](x)  # (B, N, C)
                if mask is not None and mask.shape != (x.shape[0],):
                    raise ValueError(f"image_mask: expected shape (B,) = ({x.shape[0]},), found {tuple(mask.shape)}")
                present = mask if mask is not None else torch.ones(x.shape[0], dtype=torch.bool, device=self.device)
                out[name] = (tokens, present[:, None].expand(-1, tokens.shape[1]))
            else:
                out[name] = self.encoders[name](x, mask)
        return out

    def encode(self, inputs: dict) -> torch.Tensor:
        """Modality inputs -> prefix embeddings (B, n_queries, lm.dim)."""
        tokens = self.modality_tokens(inputs)
        if not tokens:
            raise ValueError(f"inputs: expected at least one of {list(self.encoders)}, found none")
        return self.bridge(tokens)

    def _prefix_and_mask(self, inputs, input_ids, attention_mask):
        tokens = self.modality_tokens(inputs)  # validates every key, even when no modality is present
        prefix = self.bridge(tokens) if tokens else None
        if input_ids is not None:
            input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device).bool()
            P = 0 if prefix is None else prefix.shape[1]
            T = 0 if input_ids is None else input_ids.shape[1]
            if attention_mask.ndim == 2 and attention_mask.shape[1] == T and P:  # text-only mask: prefix is real
                attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], P), attention_mask], 1)
            elif attention_mask.ndim != 2 or attention_mask.shape[1] != P + T:
                raise ValueError(f"attention_mask: expected shape (B, T) = (B, {T}) or (B, P+T) = (B, {P + T}), "
                                 f"found {tuple(attention_mask.shape)}")
        return prefix, input_ids, attention_mask

    # ---- language model entry points ------------------------------------------------------------------------------

    def forward(self, inputs: dict | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> LMOutput:
        """Logits (B, P+T, vocab); with labels (B, T) (-100 ignored) the next-token loss over the text."""
        prefix, input_ids, attention_mask = self._prefix_and_mask(inputs, input_ids, attention_mask)
        if labels is not None:
            labels = labels.to(self.device)
        return self.lm(input_ids, prefix_embeds=prefix, attention_mask=attention_mask, labels=labels)

    @torch.inference_mode()
    def generate(self, inputs: dict | None, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
        """New tokens (B, n) after the prefix and the (left-padded) prompt; options as LanguageModel.generate."""
        prefix, input_ids, attention_mask = self._prefix_and_mask(inputs, input_ids, attention_mask)
        return self.lm.generate(input_ids, prefix_embeds=prefix, attention_mask=attention_mask, **kw)

    @torch.inference_mode()
    def score(self, inputs: dict | None, input_ids: torch.Tensor | None, candidates: list[list[int]],
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_candidates) summed log-likelihood of each candidate continuation."""
        prefix, input_ids, attention_mask = self._prefix_and_mask(inputs, input_ids, attention_mask)
        return self.lm.score(input_ids, candidates, prefix_embeds=prefix, attention_mask=attention_mask)

    def pooled(self, inputs: dict | None, input_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, lm.dim): mean of the final hidden states over the prefix and the real text positions."""
        prefix, input_ids, attention_mask = self._prefix_and_mask(inputs, input_ids, attention_mask)
        hidden = self.lm(input_ids, prefix_embeds=prefix, attention_mask=attention_mask).hidden  # (B, L, dim)
        if attention_mask is None:
            return hidden.mean(1)
        weight = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
        return (hidden * weight).sum(1) / weight.sum(1).clamp(min=1)

    def update_router_bias(self) -> None:
        self.lm.update_router_bias()

    # ---- checkpoints ----------------------------------------------------------------------------------------------

    def save(self, path: str | Path, dtype: torch.dtype | None = None, *, extra_config: dict | None = None,
             extra_tensors: dict[str, torch.Tensor] | None = None, card: dict | None = None) -> Path:
        """Write a checkpoint directory (see mmcore.checkpoint); dtype=torch.float16 halves the file."""
        from mmcore.checkpoint import save_model

        return save_model(self, path, dtype=dtype, extra_config=extra_config, extra_tensors=extra_tensors, card=card)
