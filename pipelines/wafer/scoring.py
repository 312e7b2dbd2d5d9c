"""Wafer scoring on the mmcore core: one-hot map -> timm encoder -> cross-modal bridge -> MoE core -> scores.

    map (rows, cols) --fractions--> (3, 32, 32) --ImageEncoder--> 4 tokens (B, 4, 512)
        --CrossModalBridge--> prefix (B, 8, dim) --LanguageModel blocks--> mean hidden state (B, dim) = embedding
    embedding --Linear--> K pattern logits (multi-label sigmoid, MixedWM38 style) + 1 defect logit

Per-class probabilities: each pattern's calibrated sigmoid; `none` = 1 - defect score. The defect score is the
probability that any pattern is present. The anomaly score is the Mahalanobis distance to the nearest known
population (each label set seen in training: `none`, single patterns, mixtures; shared covariance) in two views, the
network's features and the fail autocorrelation of the input, the larger of the two in held-out units, turned into a
probability by its rank among held-out maps of known classes: 0.99 means farther than 99% of them.
Temperatures (one per output) are fitted on held-out maps so the probabilities are calibrated. A mixed map's pattern
set is every pattern at or above its own decision threshold, also fitted on held-out maps: a calibrated 0.5 is the
right cut for one pattern alone, not for naming all of a mixture's patterns at once.

Everything beyond the core lives in the checkpoint beside it: `extra_config["wafer"]` (classes, input size,
thresholds) and extra tensors `wafer.*` (head, temperatures, anomaly populations and calibration).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
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


MAX_LAG = 6  # cells of the model input: the autocorrelation lags the anomaly score looks at
N_LAG_ORBITS = MAX_LAG * (MAX_LAG + 3) // 2  # lags (a, b) with 0 <= a <= b, 1 <= b <= MAX_LAG


@lru_cache(maxsize=8)
def _lag_orbits(size: int, max_lag: int = MAX_LAG) -> torch.Tensor:
    """(n_orbits, 2S * 2S) averaging matrix: row o averages the 8 rotations / flips of lag (a, b), 1 <= b <= max_lag,
    0 <= a <= b, in a (2S, 2S) circular autocorrelation (27 orbits for max_lag 6)."""
    n = 2 * size
    rows = []
    for b in range(1, max_lag + 1):
        for a in range(b + 1):
            lags = {(sa * u, sb * v) for u, v in ((a, b), (b, a)) for sa in (1, -1) for sb in (1, -1)}
            row = torch.zeros(n * n)
            for dy, dx in lags:
                row[(dy % n) * n + dx % n] = 1.0 / len(lags)
            rows.append(row)
    return torch.stack(rows)


def fail_autocorrelation(x: torch.Tensor, max_lag: int = MAX_LAG) -> torch.Tensor:
    """(B, 3, S, S) model input -> (B, n_orbits): the autocorrelation of the fail fraction over the wafer's dies at
    lags up to `max_lag` cells, each lag averaged over the model's rot90 / flip symmetry, divided by the variance.
    A repeated die-level structure (a lattice, a stripe) shows as peaks at its pitch that no smooth, random or
    single-blob pattern has; the network, trained on the known classes, has no reason to encode them."""
    x = x.float()
    size = x.shape[-1]
    fail, die = x[:, 2], x[:, 1] + x[:, 2]
    on_wafer = (die > 0.5).to(x.dtype)
    mean = (fail * on_wafer).sum((1, 2), keepdim=True) / on_wafer.sum((1, 2), keepdim=True).clamp(min=1.0)
    f = (fail - mean) * on_wafer  # (B, S, S), zero off the wafer
    spectrum = torch.fft.rfft2(f, s=(2 * size, 2 * size))  # zero-padded: lags do not wrap around
    auto = torch.fft.irfft2(spectrum * spectrum.conj(), s=(2 * size, 2 * size))  # (B, 2S, 2S)
    variance = auto[:, 0, 0].clamp(min=1e-6)
    return auto.flatten(1) @ _lag_orbits(size, max_lag).to(x.device).T / variance[:, None]


ANOMALY_FEATURES = ("core", "core+encoder", "core+encoder+autocorrelation")


class WaferNet(nn.Module):
    """The core plus a linear multi-label head on its pooled embedding: K pattern logits + 1 defect logit.

    Anomaly features (`anomaly_features`), each a view with its own distance: "core" = the pooled embedding;
    "core+encoder" = the embedding joined with the mean encoder token (distances over several depths of the network,
    as Lee et al. 2018 do for Mahalanobis out-of-distribution scores: a pattern the core maps near a known class can
    still sit far away in the encoder); "core+encoder+autocorrelation" adds a second view, the fail autocorrelation
    of the input (`fail_autocorrelation`), for structure at die pitch that the network's features do not keep."""

    def __init__(self, core, classes: Sequence[str] = PATTERNS,
                 anomaly_features: str = "core+encoder+autocorrelation"):
        super().__init__()
        if anomaly_features not in ANOMALY_FEATURES:
            raise ValueError(f"anomaly_features: expected one of {ANOMALY_FEATURES}, found {anomaly_features!r}")
        self.core = core
        self.classes = tuple(classes)
        self.head = nn.Linear(core.cfg.lm.dim, len(self.classes) + 1)
        self.anomaly_features = anomaly_features
        dim, enc_dim = core.cfg.lm.dim, core.encoders["image"].out_dim
        self.anomaly_view_sizes = {"core": (dim,), "core+encoder": (dim + enc_dim,),
                                   "core+encoder+autocorrelation": (dim + enc_dim, N_LAG_ORBITS)}[
            anomaly_features]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, dim): the same mean of final hidden states as `MultimodalModel.pooled` over the
        prefix, without projecting every position onto the vocabulary."""
        prefix = self.core.encode({"image": x})  # (B, n_queries, dim)
        return self.core.lm.hidden_states(prefix).mean(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, emb, _ = self.forward_all(x)
        return logits, emb

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (B, K+1), embedding (B, dim), anomaly features (B, sum(anomaly_view_sizes)))."""
        tokens = self.core.modality_tokens({"image": x})  # {"image": ((B, N, C), mask)}
        prefix = self.core.bridge(tokens)  # (B, n_queries, dim)
        emb = self.core.lm.hidden_states(prefix).mean(1)
        feats = [emb]
        if self.anomaly_features != "core":
            feats.append(tokens["image"][0].mean(1))
        if self.anomaly_features.endswith("+autocorrelation"):
            feats.append(fail_autocorrelation(x))
        return self.head(emb), emb, torch.cat(feats, 1)

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
        self.anomaly_view_sizes = (self.encoder.out_dim,)

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
    """Distance to the nearest known population (label set) in each view of a wafer's features, calibrated to a
    probability on held-out known maps.

    Per view: features standardised, a shared within-population covariance (shrunk towards its diagonal, so views
    whose features differ in scale by orders of magnitude can share a model), Mahalanobis distance to the nearest
    population mean, divided by that view's 99th percentile on held-out known maps. The wafer's distance is the
    largest over views (unusual in any view is unusual), ranked among the held-out maps' distances."""

    QUANTILE = 0.99  # held-out distance quantile that sets each view's unit

    def __init__(self, views: Sequence[dict[str, torch.Tensor]], quantiles: torch.Tensor):
        # per view: center (D,), spread (D,), whiten (D, D) [z = (f - center) / spread @ whiten],
        # means (P, D) population means in z coordinates, unit () held-out distance quantile
        self.views = [{k: v.float() for k, v in view.items()} for view in views]
        self.quantiles = quantiles.float()  # (Q,) held-out distances at probabilities linspace(0, 1, Q)

    @classmethod
    def fit(cls, feats: torch.Tensor, populations: Sequence[str], view_sizes: Sequence[int] | None = None,
            min_count: int = 5, shrinkage: float = 0.05) -> "AnomalyModel":
        """Population means and a shared covariance per view (`view_sizes` split the feature columns; one view
        when None)."""
        feats = feats.double()
        view_sizes = tuple(view_sizes or (feats.shape[1],))
        if sum(view_sizes) != feats.shape[1]:
            raise ValueError(f"view_sizes: expected them to sum to the {feats.shape[1]} feature columns, "
                             f"found {view_sizes}")
        names = sorted(set(populations))
        index = torch.tensor([names.index(p) for p in populations])
        keep = [i for i, _ in enumerate(names) if int((index == i).sum()) >= min_count]
        if not keep:
            raise ValueError(f"populations: none has {min_count} maps; found {len(populations)} maps")
        views = []
        for part in feats.split(view_sizes, dim=1):
            # Relative floors keep every stored number finite in float16 (max 65504) when a feature or a
            # direction barely varies in training (small pools, dead channels).
            spread = part.std(0)
            center, spread = part.mean(0), spread.clamp(min=max(1e-3 * float(spread.max()), 1e-6))
            z = (part - center) / spread
            means = torch.stack([z[index == i].mean(0) for i in keep])
            resid = torch.cat([z[index == i] - means[k] for k, i in enumerate(keep)])
            cov = resid.T @ resid / max(len(resid) - 1, 1)
            cov = (1 - shrinkage) * cov + shrinkage * torch.diag(cov.diagonal())
            evals, evecs = torch.linalg.eigh(cov)
            whiten = evecs / evals.clamp(min=max(1e-4 * float(evals.max()), 1e-8)).sqrt()  # (D, D)
            views.append({"center": center, "spread": spread, "whiten": whiten, "means": means @ whiten,
                          "unit": torch.tensor(1.0)})
        return cls(views, torch.zeros(2))

    def view_distances(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, V) Mahalanobis distance to the nearest population mean in each view, in that view's unit."""
        sizes = [len(v["center"]) for v in self.views]
        if feats.shape[1] != sum(sizes):
            raise ValueError(f"anomaly features: expected {sum(sizes)} columns (views {sizes}), "
                             f"found {feats.shape[1]}")
        out = [torch.cdist((part.float() - v["center"]) / v["spread"] @ v["whiten"], v["means"]).min(1).values
               / v["unit"] for part, v in zip(feats.split(sizes, dim=1), self.views)]
        return torch.stack(out, 1)

    def distance(self, feats: torch.Tensor) -> torch.Tensor:
        """(B,) the largest view distance."""
        return self.view_distances(feats).max(1).values

    def calibrate(self, held_out: torch.Tensor, n_quantiles: int = 201) -> None:
        for view in self.views:
            view["unit"] = torch.tensor(1.0)
        per_view = self.view_distances(held_out)
        for view, d in zip(self.views, per_view.T):
            view["unit"] = torch.quantile(d, self.QUANTILE).clamp(min=1e-6)
        d = self.distance(held_out)
        self.quantiles = torch.quantile(d, torch.linspace(0, 1, n_quantiles))

    def score(self, feats: torch.Tensor) -> torch.Tensor:
        """(B,) probability-like: the share of held-out known maps closer to a known population than this one;
        beyond the farthest, it approaches 1 with an exponential tail whose scale is the top decile's spread."""
        d = self.distance(feats).numpy().astype(np.float64)
        q = self.quantiles.numpy().astype(np.float64)
        probs = np.linspace(0, 1, len(q))
        inside = np.interp(d, q, probs)
        scale = max(q[-1] - q[int(0.9 * (len(q) - 1))], 1e-6)
        tail_start = 1.0 - 1.0 / len(q)
        tail = 1.0 - (1.0 - tail_start) * np.exp(-(d - q[-1]) / scale)
        return torch.from_numpy(np.where(d > q[-1], tail, np.minimum(inside, tail_start)).astype(np.float32))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"wafer.anomaly.quantiles": self.quantiles.contiguous()}
        for i, view in enumerate(self.views):
            out.update({f"wafer.anomaly.view{i}.{k}": v.contiguous() for k, v in view.items()})
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "AnomalyModel":
        if "wafer.anomaly.quantiles" not in t:
            raise WaferError("checkpoint: no anomaly calibration (wafer.anomaly.quantiles); not a wafer scoring "
                             "checkpoint made by `mmcore train wafer`")
        if "wafer.anomaly.means" in t:  # a checkpoint from before views: one view, distances in its own units
            center = t["wafer.anomaly.center"]
            views = [{"center": center, "spread": torch.ones_like(center), "whiten": t["wafer.anomaly.whiten"],
                      "means": t["wafer.anomaly.means"], "unit": torch.tensor(1.0)}]
        else:
            n_views = len({k.split(".")[2] for k in t if k.startswith("wafer.anomaly.view")})
            views = [{k: t[f"wafer.anomaly.view{i}.{k}"] for k in ("center", "spread", "whiten", "means", "unit")}
                     for i in range(n_views)]
        return cls(views, t["wafer.anomaly.quantiles"])


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


THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.025), 3)  # candidate pattern decision thresholds
THRESHOLD_SIGNIFICANCE = 2.0  # sign-test z a threshold's gain over 0.5 must reach before it replaces 0.5


def fit_pattern_thresholds(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(K,) per-pattern decision thresholds: each maximises that pattern's accuracy on the held-out maps that carry
    at least one pattern (where the pattern set is read), and replaces 0.5 only when its gain in correct decisions is
    significant: more than THRESHOLD_SIGNIFICANCE x sqrt(maps on which the two cuts disagree) (a sign test). Cuts
    moved by noise cost exact matches on fresh maps (measured: 0.736 vs 0.755 at 0.5 on 750 validation mixtures)."""
    probs, truth = np.asarray(probs, np.float64), np.asarray(targets) >= 0.5
    if probs.shape != truth.shape:
        raise ValueError(f"probs/targets: expected equal shapes, found {probs.shape} and {truth.shape}")
    defective = truth.any(1)
    if not defective.any():
        return np.full(probs.shape[1], 0.5, np.float32)
    probs, truth = probs[defective], truth[defective]
    correct = (probs[:, None, :] >= THRESHOLD_GRID[None, :, None]) == truth[:, None, :]  # (N, T, K)
    at_half = (probs >= 0.5) == truth  # (N, K)
    gain = correct.sum(0) - at_half.sum(0)[None, :]  # (T, K) correct decisions over the 0.5 cut
    disagree = (correct != at_half[:, None, :]).sum(0)  # (T, K)
    significant = gain > THRESHOLD_SIGNIFICANCE * np.sqrt(np.maximum(disagree, 1))
    score = np.where(significant, gain - 1e-9 * np.abs(THRESHOLD_GRID - 0.5)[:, None], -np.inf)
    best = score.argmax(0)
    return np.where(significant.any(0), THRESHOLD_GRID[best], 0.5).astype(np.float32)


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
    pattern_threshold: np.ndarray | None = None  # (K,) per-pattern decision thresholds; None = 0.5 each

    def class_probs(self, i: int) -> dict[str, float]:
        out = {c: float(p) for c, p in zip(self.classes, self.pattern_probs[i])}
        out["none"] = float(1.0 - self.defect[i])
        return out

    def predicted_class(self, i: int, defect_threshold: float = 0.5) -> str:
        if self.defect[i] < defect_threshold:
            return "none"
        return self.classes[int(self.pattern_probs[i].argmax())]

    def labels(self, i: int) -> tuple[str, ...]:
        """Every pattern at or above its decision threshold (mixed maps carry several)."""
        cut = np.full(len(self.classes), 0.5) if self.pattern_threshold is None else self.pattern_threshold
        return tuple(c for c, p, t in zip(self.classes, self.pattern_probs[i], cut) if p >= t)


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
        # NHWC convolutions are faster than NCHW for these small maps on CPU (oneDNN): the encoder ~2x at one thread,
        # the whole model 1.4x at two (1,300 vs 904 maps/s); the same numbers either way.
        self.net.core.encoders["image"].to(memory_format=torch.channels_last)
        t = core.extra_tensors
        self.net.head.load_state_dict({"weight": t["wafer.head.weight"], "bias": t["wafer.head.bias"]})
        self.temperature = t["wafer.temperature"].float().to(self.device)
        # Checkpoints from before per-pattern thresholds cut every pattern at 0.5.
        cut = t.get("wafer.pattern_threshold")
        self.pattern_threshold = np.full(len(self.classes), 0.5, np.float32) if cut is None else cut.float().numpy()
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
        x = torch.as_tensor(x, dtype=torch.float32, device=self.device).contiguous(memory_format=torch.channels_last)
        logits, emb, feats = self.net.forward_all(x)
        probs = torch.sigmoid(logits / self.temperature).cpu().numpy()
        extra = None if self.extra_head is None else torch.sigmoid(self.extra_head(emb)).cpu().numpy()
        return Scores(self.classes, probs[:, :-1], probs[:, -1], self.anomaly.score(feats.cpu()).numpy(),
                      self.extra_classes, extra, self.pattern_threshold)

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


def checkpoint_tensors(net: WaferNet, temperature: torch.Tensor, pattern_threshold: np.ndarray,
                       anomaly: AnomalyModel) -> dict[str, torch.Tensor]:
    return {"wafer.head.weight": net.head.weight.detach(), "wafer.head.bias": net.head.bias.detach(),
            "wafer.temperature": temperature, "wafer.pattern_threshold": torch.as_tensor(pattern_threshold),
            **anomaly.tensors()}


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

