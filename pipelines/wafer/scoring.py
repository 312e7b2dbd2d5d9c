"""Wafer scoring on the mmcore core: one-hot map -> timm encoder -> cross-modal bridge -> MoE core -> scores.

    map (rows, cols) --fractions--> (3, 32, 32) --ImageEncoder--> 4 tokens (B, 4, 512)
        --CrossModalBridge--> prefix (B, 8, dim) --LanguageModel blocks--> mean hidden state (B, dim) = embedding
    embedding --Linear--> K pattern logits (multi-label sigmoid, MixedWM38 style) + 1 defect logit

Per-class probabilities: each pattern's calibrated sigmoid; `none` = 1 - defect score. The defect score is the
probability that any pattern is present. The anomaly score is the Mahalanobis distance of the embedding to the
nearest known population (each label set seen in training: `none`, single patterns, mixtures; shared covariance),
turned into a probability by its rank among held-out maps of known classes: 0.99 means farther than 99% of them.
Temperatures (one per output) are fitted on held-out maps so the probabilities are calibrated.

Everything beyond the core lives in the checkpoint beside it: `extra_config["wafer"]` (classes, input size,
thresholds) and extra tensors `wafer.*` (head, temperatures, anomaly populations and calibration).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from mmcore.config import BridgeConfig, ImageEncoderConfig, LMConfig, ModelConfig, MoEConfig
from pipelines.wafer.dataset import DEFAULT_SIZE, batch_input
from pipelines.wafer.maps import PATTERNS, WaferError

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "data" / "checkpoints" / "wafer"
DEFAULT_PRODUCT = "default"


def wafer_model_config(encoder: str = "resnet10t", size: int = DEFAULT_SIZE, dim: int = 128) -> ModelConfig:
    """The core for wafer maps: a small timm CNN at output stride 16 (a 32 x 32 map gives 2 x 2 tokens), a one-layer
    bridge with 8 queries and a two-block core (one dense, one MoE with 8 routed experts, top-2)."""
    return ModelConfig(
        lm=LMConfig(vocab_size=512, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, n_dense_layers=1,
                    dense_hidden=2 * dim, max_seq_len=64,
                    moe=MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=dim // 2,
                                  n_groups=2, topk_groups=1)),
        bridge=BridgeConfig(dim=dim, n_queries=8, n_layers=1, n_heads=4),
        image=ImageEncoderConfig(model_name=encoder, img_size=size, in_chans=3, timm_kwargs={"output_stride": 16}),
    )


# ---------------------------------------------------------------------------------------------------- thresholds


@dataclass
class ProductThresholds:
    defect: float = 0.5  # flag a wafer as defective at defect_score >= this
    anomaly: float = 0.99  # flag an unknown pattern at anomaly_score >= this (~1% of known maps)

    def validate(self, where: str) -> None:
        for name in ("defect", "anomaly"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{where}.{name}: expected a probability 0..1, found {value!r}")


@dataclass
class Thresholds:
    """Per-product thresholds; products not listed use `default`. JSON: {"default": {...}, "P1": {...}}."""

    products: dict[str, ProductThresholds] = field(default_factory=lambda: {DEFAULT_PRODUCT: ProductThresholds()})

    def for_product(self, product: str | None) -> ProductThresholds:
        return self.products.get(product or DEFAULT_PRODUCT, self.products[DEFAULT_PRODUCT])

    def to_dict(self) -> dict:
        return {name: {"defect": t.defect, "anomaly": t.anomaly} for name, t in self.products.items()}

    @classmethod
    def from_dict(cls, data: dict, where: str = "thresholds") -> "Thresholds":
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object of products, found {type(data).__name__}")
        products = {}
        for name, entry in data.items():
            if not isinstance(entry, dict) or set(entry) - {"defect", "anomaly"}:
                raise ValueError(f"{where}.{name}: expected an object with 'defect' and/or 'anomaly', found {entry!r}")
            products[name] = ProductThresholds(**entry)
            products[name].validate(f"{where}.{name}")
        products.setdefault(DEFAULT_PRODUCT, ProductThresholds())
        return cls(products)

    @classmethod
    def load(cls, path: str | Path) -> "Thresholds":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise WaferError(f"{path}: thresholds file not found") from exc
        except json.JSONDecodeError as exc:
            raise WaferError(f"{path}: not valid JSON ({exc})") from exc
        try:
            return cls.from_dict(data, where=str(path))
        except ValueError as exc:
            raise WaferError(str(exc)) from exc


# -------------------------------------------------------------------------------------------------------- network


class WaferNet(nn.Module):
    """The core plus a linear multi-label head on its pooled embedding: K pattern logits + 1 defect logit.

    Anomaly features (`anomaly_features`): "core" = the pooled embedding; "core+encoder" = the embedding joined with
    the mean encoder token (distances over several depths of the network, as Lee et al. 2018 do for Mahalanobis
    out-of-distribution scores: a pattern the core maps near a known class can still sit far away in the encoder)."""

    def __init__(self, core, classes: Sequence[str] = PATTERNS, anomaly_features: str = "core+encoder"):
        super().__init__()
        if anomaly_features not in ("core", "core+encoder"):
            raise ValueError(f"anomaly_features: expected 'core' or 'core+encoder', found {anomaly_features!r}")
        self.core = core
        self.classes = tuple(classes)
        self.head = nn.Linear(core.cfg.lm.dim, len(self.classes) + 1)
        self.anomaly_features = anomaly_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, dim): the same mean of final hidden states as `MultimodalModel.pooled` over the
        prefix, without projecting every position onto the vocabulary."""
        prefix = self.core.encode({"image": x})  # (B, n_queries, dim)
        return self.core.lm.hidden_states(prefix).mean(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, emb, _ = self.forward_all(x)
        return logits, emb

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (B, K+1), embedding (B, dim), anomaly features (B, F))."""
        tokens = self.core.modality_tokens({"image": x})  # {"image": ((B, N, C), mask)}
        prefix = self.core.bridge(tokens)  # (B, n_queries, dim)
        emb = self.core.lm.hidden_states(prefix).mean(1)
        feats = emb if self.anomaly_features == "core" else torch.cat([emb, tokens["image"][0].mean(1)], 1)
        return self.head(emb), emb, feats

    def update_router_bias(self) -> None:
        self.core.update_router_bias()


class LinearProbe(nn.Module):
    """Ablation: the same timm encoder, its tokens mean-pooled, one linear layer (no bridge, no core)."""

    def __init__(self, core, classes: Sequence[str] = PATTERNS):
        super().__init__()
        self.core = core  # kept whole so the probe saves as an ordinary checkpoint; only the encoder runs
        self.encoder = core.encoders["image"]
        self.classes = tuple(classes)
        self.head = nn.Linear(self.encoder.out_dim, len(self.classes) + 1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).mean(1)  # (B, N, C) -> (B, C)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(x)
        return self.head(emb), emb

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, emb = self(x)
        return logits, emb, emb


# -------------------------------------------------------------------------------------------------------- anomaly


class AnomalyModel:
    """Distance to the nearest known population (label set), calibrated to a probability on held-out known maps."""

    def __init__(self, means: torch.Tensor, whiten: torch.Tensor, center: torch.Tensor, quantiles: torch.Tensor):
        self.means = means.float()  # (P, D) population means, in whitened coordinates
        self.whiten = whiten.float()  # (D, D): whitened = (emb - center) @ whiten
        self.center = center.float()  # (D,)
        self.quantiles = quantiles.float()  # (Q,) held-out distances at probabilities linspace(0, 1, Q)

    @classmethod
    def fit(cls, emb: torch.Tensor, populations: Sequence[str], min_count: int = 5,
            shrinkage: float = 0.05) -> "AnomalyModel":
        """Means per population and a shared covariance (with shrinkage towards its diagonal mean)."""
        emb = emb.double()
        names = sorted(set(populations))
        index = torch.tensor([names.index(p) for p in populations])
        keep = [i for i, _ in enumerate(names) if int((index == i).sum()) >= min_count]
        if not keep:
            raise ValueError(f"populations: none has {min_count} maps; found {len(populations)} maps")
        center = emb.mean(0)
        means = torch.stack([emb[index == i].mean(0) for i in keep])
        resid = torch.cat([emb[index == i] - means[k] for k, i in enumerate(keep)])
        cov = resid.T @ resid / max(len(resid) - 1, 1)
        cov = (1 - shrinkage) * cov + shrinkage * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
        evals, evecs = torch.linalg.eigh(cov)
        whiten = evecs / evals.clamp(min=1e-8).sqrt()  # (D, D)
        return cls((means - center) @ whiten, whiten, center, torch.zeros(2))

    def distance(self, emb: torch.Tensor) -> torch.Tensor:
        """(B,) Mahalanobis distance to the nearest population mean."""
        z = (emb.float() - self.center) @ self.whiten  # (B, D)
        return torch.cdist(z, self.means).min(1).values

    def calibrate(self, held_out: torch.Tensor, n_quantiles: int = 201) -> None:
        d = self.distance(held_out)
        self.quantiles = torch.quantile(d, torch.linspace(0, 1, n_quantiles))

    def score(self, emb: torch.Tensor) -> torch.Tensor:
        """(B,) probability-like: the share of held-out known maps closer to a known population than this one;
        beyond the farthest, it approaches 1 with an exponential tail whose scale is the top decile's spread."""
        d = self.distance(emb).numpy().astype(np.float64)
        q = self.quantiles.numpy().astype(np.float64)
        probs = np.linspace(0, 1, len(q))
        inside = np.interp(d, q, probs)
        scale = max(q[-1] - q[int(0.9 * (len(q) - 1))], 1e-6)
        tail_start = 1.0 - 1.0 / len(q)
        tail = 1.0 - (1.0 - tail_start) * np.exp(-(d - q[-1]) / scale)
        return torch.from_numpy(np.where(d > q[-1], tail, np.minimum(inside, tail_start)).astype(np.float32))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"wafer.anomaly.means": self.means.contiguous(), "wafer.anomaly.whiten": self.whiten.contiguous(),
                "wafer.anomaly.center": self.center.contiguous(), "wafer.anomaly.quantiles": self.quantiles.contiguous()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "AnomalyModel":
        return cls(t["wafer.anomaly.means"], t["wafer.anomaly.whiten"], t["wafer.anomaly.center"],
                   t["wafer.anomaly.quantiles"])


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """(K,) per-output temperatures minimising the held-out binary cross-entropy (Guo et al. 2017, per head)."""
    log_t = torch.zeros(logits.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps)
    bce = nn.BCEWithLogitsLoss()

    def closure():
        opt.zero_grad()
        loss = bce(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    opt.step(closure)
    return log_t.detach().exp().clamp(0.05, 20.0)


def defect_target(targets: torch.Tensor) -> torch.Tensor:
    """(B, K) multi-hot -> (B, K+1) with a last column 'any pattern present'."""
    return torch.cat([targets, (targets.sum(1, keepdim=True) > 0).to(targets.dtype)], 1)


# -------------------------------------------------------------------------------------------------------- scoring


@dataclass
class Scores:
    """Batch outputs: probabilities (B, K) per pattern, `none` (B,), defect (B,), anomaly (B,), embedding (B, D)."""

    classes: tuple[str, ...]
    pattern_probs: np.ndarray
    defect: np.ndarray
    anomaly: np.ndarray
    extra_classes: tuple[str, ...] = ()  # classes added by a few-shot adapter
    extra_probs: np.ndarray | None = None  # (B, len(extra_classes))

    def class_probs(self, i: int) -> dict[str, float]:
        out = {c: float(p) for c, p in zip(self.classes, self.pattern_probs[i])}
        out["none"] = float(1.0 - self.defect[i])
        return out

    def predicted_class(self, i: int, defect_threshold: float = 0.5) -> str:
        if self.defect[i] < defect_threshold:
            return "none"
        return self.classes[int(self.pattern_probs[i].argmax())]

    def labels(self, i: int, threshold: float = 0.5) -> tuple[str, ...]:
        """Every pattern at or above `threshold` (mixed maps carry several)."""
        return tuple(c for c, p in zip(self.classes, self.pattern_probs[i]) if p >= threshold)


class WaferScorer:
    """Loads a wafer checkpoint once and scores batches of maps. The same object serves the local engine and,
    as a Ray Data callable class, each Ray actor (`__call__` takes and returns a dict of numpy arrays)."""

    def __init__(self, checkpoint: str | Path | None = None, device: str = "cpu", threads: int | None = None,
                 adapter: str | Path | None = None):
        import mmcore

        if threads:
            torch.set_num_threads(threads)
        path = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
        if not (path / "config.json").is_file():
            raise WaferError(f"{path}: not a wafer checkpoint folder (no config.json); train one with "
                             f"`mmcore train wafer --out DIR`")
        self.device = torch.device(device)
        core = mmcore.load(path, device=self.device)
        meta = core.extra_config.get("wafer")
        if not meta:
            raise WaferError(f"{path}/config.json: no 'wafer' section in 'extra'; not a wafer scoring checkpoint")
        self.meta = meta
        self.classes = tuple(meta["classes"])
        self.size = int(meta["input_size"])
        if meta.get("head") == "linear":
            self.net = LinearProbe(core, self.classes)
        else:
            self.net = WaferNet(core, self.classes, anomaly_features=meta.get("anomaly_features", "core"))
        self.net = self.net.to(self.device).eval()
        t = core.extra_tensors
        self.net.head.load_state_dict({"weight": t["wafer.head.weight"], "bias": t["wafer.head.bias"]})
        self.temperature = t["wafer.temperature"].float().to(self.device)
        self.anomaly = AnomalyModel.from_tensors(t)
        self.thresholds = Thresholds.from_dict(meta.get("thresholds", {}))
        self.card = core.card
        self.extra_head: nn.Module | None = None
        self.extra_classes: tuple[str, ...] = ()
        if adapter is not None:
            from pipelines.wafer.finetune import load_fewshot

            load_fewshot(self, adapter)

    def attach_extra_head(self, head: nn.Module, classes: Sequence[str]) -> None:
        """Score few-shot classes too (their sigmoid probabilities come out as `Scores.extra_probs`)."""
        self.extra_head, self.extra_classes = head, tuple(classes)
    @torch.inference_mode()
    def score_inputs(self, x: np.ndarray) -> Scores:
        """x (B, 3, S, S) float model input -> Scores."""
        logits, emb, feats = self.net.forward_all(torch.as_tensor(x, dtype=torch.float32, device=self.device))
        probs = torch.sigmoid(logits / self.temperature).cpu().numpy()
        extra = None if self.extra_head is None else torch.sigmoid(self.extra_head(emb)).cpu().numpy()
        return Scores(self.classes, probs[:, :-1], probs[:, -1], self.anomaly.score(feats.cpu()).numpy(),
                      self.extra_classes, extra)

    def score_grids(self, grids: Sequence[np.ndarray]) -> Scores:
        return self.score_inputs(batch_input(grids, self.size))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data batch {"data": (B, 3, S, S), ...} -> the other columns plus probabilities and scores."""
        scores = self.score_inputs(batch["data"])
        out = {k: v for k, v in batch.items() if k != "data"}
        out["pattern_probs"] = scores.pattern_probs.astype(np.float32)
        out["defect_score"] = scores.defect.astype(np.float32)
        out["anomaly_score"] = scores.anomaly.astype(np.float32)
        return out


def read_wafer_meta(checkpoint: str | Path | None) -> dict:
    """The checkpoint's `extra.wafer` section (classes, input size, thresholds) without loading weights."""
    path = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
    try:
        meta = json.loads((path / "config.json").read_text()).get("extra", {}).get("wafer")
    except (OSError, json.JSONDecodeError) as exc:
        raise WaferError(f"{path / 'config.json'}: not a readable checkpoint config ({exc})") from exc
    if not meta:
        raise WaferError(f"{path / 'config.json'}: no 'wafer' section in 'extra'; not a wafer scoring checkpoint")
    return meta


def checkpoint_tensors(net: WaferNet, temperature: torch.Tensor, anomaly: AnomalyModel) -> dict[str, torch.Tensor]:
    return {"wafer.head.weight": net.head.weight.detach(), "wafer.head.bias": net.head.bias.detach(),
            "wafer.temperature": temperature, **anomaly.tensors()}


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """ECE: mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    confidence, correct = np.asarray(confidence, float), np.asarray(correct, float)
    if len(confidence) == 0:
        return math.nan
    edges = np.linspace(0, 1, n_bins + 1)
    bins = np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(ece)

