"""`mmcore train wafer`: the wafer scoring model on synthetic maps (default) or on labelled real maps (`--data`).

Data: a pool of maps generated once from the run's seed (or read from `--data`: a WM-811K `LSWMD.pkl`, a
MixedWM38 `.npz` or a folder with labels.csv), each batch a seeded draw from it with a random rotation / flip
(patterns are defined up to the wafer's symmetry). Held-out maps come from seeds disjoint from training
(or a 10% split of `--data`); they fit the temperatures and calibrate the anomaly score after training.

Mixtures are 29 of the 38 label sets and only a mixed map teaches the model to name every pattern at once, so the
synthetic pools hold 60% mixtures (`mixed_fraction`; single patterns and `none` share the rest equally).

Options (`--option key=value`): n_train (pool size), n_holdout, mixed_fraction, size (input side), head (`core` =
bridge + MoE core, `linear` = the ablation: the same encoder with a linear head), encoder (timm name), init (a wafer
checkpoint folder whose weights, core and head, start the run instead of a random initialisation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mmcore.errors import InputError
from mmcore.train import Recipe, TrainConfig, register_recipe
from pipelines.wafer.dataset import DEFAULT_SIZE, WaferSet, from_wafers, load_labelled, synthetic_set
from pipelines.wafer.maps import PATTERNS
from pipelines.wafer.scoring import (AnomalyModel, LinearProbe, Thresholds, WaferNet, checkpoint_tensors,
                                     defect_target, fit_pattern_thresholds, fit_temperature, wafer_model_config)

TRAIN_SEED, HOLDOUT_SEED = 1, 5_000  # training pools use seeds below HOLDOUT_SEED; evaluation uses >= 10_000


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random rot90 (0-3 quarter turns) and horizontal flip, per batch: (B, 3, S, S) -> same."""
    k = int(torch.randint(4, (1,), generator=g))
    x = torch.rot90(x, k, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if bool(torch.randint(2, (1,), generator=g)) else x


def label_key(labels) -> str:
    return "+".join(labels) or "none"


@torch.no_grad()
def embed_all(net: nn.Module, inputs: np.ndarray, batch_size: int = 512):
    """(logits (N, K+1), embeddings (N, D), anomaly features (N, F)) for model inputs (N, 3, S, S)."""
    net.eval()
    outs = [net.forward_all(torch.as_tensor(inputs[i:i + batch_size], dtype=torch.float32))
            for i in range(0, len(inputs), batch_size)]
    return tuple(torch.cat(parts) for parts in zip(*outs))


def fit_heads(net: nn.Module, train: WaferSet, holdout: WaferSet, max_fit: int = 6000):
    """After training: temperatures and pattern decision thresholds on held-out maps, anomaly populations on training
    maps, anomaly calibration on held-out maps. Returns (temperature (K+1,), pattern thresholds (K,), AnomalyModel)."""
    logits, _, feats = embed_all(net, holdout.inputs)
    temperature = fit_temperature(logits, defect_target(torch.as_tensor(holdout.targets)))
    pattern_threshold = fit_pattern_thresholds(torch.sigmoid(logits / temperature)[:, :-1].numpy(), holdout.targets)
    n = min(len(train), max_fit)
    _, _, train_feats = embed_all(net, train.inputs[:n])
    anomaly = AnomalyModel.fit(train_feats, [label_key(lb) for lb in train.labels[:n]],
                               view_sizes=net.anomaly_view_sizes)
    anomaly.calibrate(feats)
    return temperature, pattern_threshold, anomaly


@register_recipe("wafer")
class WaferRecipe(Recipe):
    description = ("synthetic wafer maps (pipelines.wafer.synth): 8 WM-811K patterns, none and the 29 MixedWM38 "
                   "mixtures on circular layouts 25..64 dies across with 1-5% background fails")

    def __init__(self, data: str | None = None, n_train: str | int = 16_000, n_holdout: str | int = 3_000,
                 mixed_fraction: str | float = 0.6, size: str | int = DEFAULT_SIZE, head: str = "core",
                 encoder: str = "resnet10t", classes: str | None = None, init: str | None = None, **options):
        super().__init__(data, **options)
        self.n_train, self.n_holdout, self.size = int(n_train), int(n_holdout), int(size)
        self.mixed_fraction = float(mixed_fraction)
        if not 0.0 <= self.mixed_fraction <= 1.0:
            raise InputError(f"--option mixed_fraction: expected 0..1, found {mixed_fraction!r}")
        if head not in ("core", "linear"):
            raise InputError(f"--option head: expected 'core' or 'linear', found {head!r}")
        self.head, self.encoder = head, encoder
        self.classes = tuple(classes.split(",")) if classes else PATTERNS
        self.init = Path(init) if init else None
        if self.init is not None and not (self.init / "config.json").is_file():
            raise InputError(f"--option init: {self.init} is not a checkpoint folder (no config.json)")
        self._train: WaferSet | None = None
        self._holdout: WaferSet | None = None
        self.temperature = None
        self.pattern_threshold = None
        self.anomaly = None
        self._heads_fresh = False  # True between evaluate() and the save that follows it

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=700, batch_size=64, lr=3e-3, warmup_steps=50, weight_decay=0.05,
                           min_lr_ratio=0.02, log_every=25, seed=TRAIN_SEED)

    def data_card(self) -> dict:
        if self.data:
            return {"training_data": f"labelled wafer maps from {self.data} (90% train, 10% held out)",
                    "synthetic": False}
        return {"training_data": self.description, "synthetic": True, "train_maps": self.n_train,
                "mixed_fraction": self.mixed_fraction, "train_seed": TRAIN_SEED, "holdout_maps": self.n_holdout,
                "holdout_seed": HOLDOUT_SEED, "initialised_from": str(self.init) if self.init else None,
                "notice": "Trained on synthetic wafer maps only; not for production use without retraining on real "
                          "data from your fab."}

    # ---- data -----------------------------------------------------------------------------------------------------

    def sets(self) -> tuple[WaferSet, WaferSet]:
        if self._train is None:
            if self.data:
                wafers = load_labelled(self.data)
                order = np.random.default_rng(TRAIN_SEED).permutation(len(wafers))
                cut = max(1, len(wafers) // 10)
                self._holdout = from_wafers([wafers[i] for i in order[:cut]], self.size, self.classes)
                self._train = from_wafers([wafers[i] for i in order[cut:]], self.size, self.classes)
            else:
                self._train = synthetic_set(self.n_train, TRAIN_SEED, self.size, self.classes,
                                            mixed_fraction=self.mixed_fraction)
                self._holdout = synthetic_set(self.n_holdout, HOLDOUT_SEED, self.size, self.classes,
                                              mixed_fraction=self.mixed_fraction)
        return self._train, self._holdout

    def batch(self, step, micro, rank, world_size, batch_size, tokenizer) -> dict:
        train, _ = self.sets()
        g = torch.Generator().manual_seed(hash((TRAIN_SEED, step, micro, rank)) % (2 ** 63))
        idx = torch.randint(len(train), (batch_size,), generator=g).numpy()
        x = augment(torch.as_tensor(train.inputs[idx], dtype=torch.float32), g)
        return {"x": x, "y": defect_target(torch.as_tensor(train.targets[idx]))}

    # ---- model ----------------------------------------------------------------------------------------------------

    def build_model(self, tokenizer) -> nn.Module:
        from mmcore.model import MultimodalModel

        core = MultimodalModel(wafer_model_config(self.encoder, self.size))
        net = WaferNet(core, self.classes) if self.head == "core" else LinearProbe(core, self.classes)
        if self.init is not None:
            self._load_init(net)
        return net

    def _load_init(self, net: nn.Module) -> None:
        """Weights of the `init` checkpoint: same classes, head kind and architecture, or a clear error."""
        import mmcore

        start = mmcore.load(self.init)
        meta = start.extra_config.get("wafer") or {}
        found = (tuple(meta.get("classes", ())), meta.get("head", "core"), start.cfg.to_dict())
        wanted = (self.classes, self.head, net.core.cfg.to_dict())
        for name, a, b in zip(("classes", "head", "model config"), found, wanted):
            if a != b:
                raise InputError(f"--option init: {self.init} has {name} {a!r}; this run needs {b!r}")
        net.core.load_state_dict(start.state_dict())
        t = start.extra_tensors
        net.head.load_state_dict({"weight": t["wafer.head.weight"].float(), "bias": t["wafer.head.bias"].float()})

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        logits, _ = model(batch["x"])
        return nn.functional.binary_cross_entropy_with_logits(logits, batch["y"])

    def evaluate(self, model: nn.Module, tokenizer) -> dict:
        from pipelines.wafer.evaluate import known_class_metrics

        train, holdout = self.sets()
        self.temperature, self.pattern_threshold, self.anomaly = fit_heads(model, train, holdout)
        self._heads_fresh = True
        return known_class_metrics(model, holdout, self.temperature, self.pattern_threshold)

    def save(self, model: nn.Module, out_dir: Path, card: dict) -> None:
        if not self._heads_fresh:  # a save without an evaluation just before it (save_every): the weights moved
            train, holdout = self.sets()
            self.temperature, self.pattern_threshold, self.anomaly = fit_heads(model, train, holdout)
            model.train()
        self._heads_fresh = False
        core = model.core
        meta = {"classes": list(self.classes), "input_size": self.size, "head": self.head,
                "anomaly_features": getattr(model, "anomaly_features", "core"), "thresholds": Thresholds().to_dict()}
        tensors = checkpoint_tensors(model, self.temperature, self.pattern_threshold, self.anomaly)
        core.save(out_dir, dtype=torch.float16, extra_config={"wafer": meta}, extra_tensors=tensors, card=card)
