"""Trainer and recipe registry.

`Trainer`: AdamW, linear warmup then cosine decay to `min_lr_ratio * lr`, gradient clipping and accumulation, bf16
autocast on CUDA, DistributedDataParallel when launched by `torchrun` (gloo on CPU, NCCL on CUDA), resume from
`train_state.pt` (model, optimizer, scheduler, step, RNG), periodic evaluation, a tqdm progress bar and a JSONL
metrics log. After every optimizer step it calls `update_router_bias()` on the model when present (MoE balancing).

Data is a function of the step: `batch_fn(step, micro, rank, world_size) -> batch`. A resumed run therefore sees
exactly the batches the uninterrupted run would have seen, and each rank sees its own share.

Recipes are registered by name (`@register_recipe("toy")`) and run with `run_recipe(name, ...)` or
`mmcore train NAME`. Output directory: the model checkpoint (config.json, model.safetensors, tokenizer.json,
card.json) plus train_state.pt (to resume) and metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from mmcore.config import ConfigBase
from mmcore.errors import InputError

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


class UnknownRecipe(InputError, KeyError):
    """`mmcore train NAME` with a name no recipe module registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass
class TrainConfig(ConfigBase):
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # samples per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    save_every: int = 0  # 0: save only at the end
    seed: int = 0
    progress: bool = True  # tqdm bar on rank 0

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig.{name}: expected a positive integer, found {value!r}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name}: expected an integer >= 0, found {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr: expected > 0, found {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio: expected 0..1, found {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("TrainConfig.weight_decay/grad_clip: expected >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"TrainConfig.beta1/beta2: expected in [0, 1), found {self.beta1}, {self.beta2}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at `step`: linear warmup from 1/warmup, then cosine down to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms, biases) and embeddings-as-tables of positions do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def default_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Next-token loss of a MultimodalModel batch {inputs, input_ids, attention_mask, labels}."""
    return model(batch.get("inputs"), input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                 labels=batch["labels"]).loss


# ---- distributed ------------------------------------------------------------------------------------------------

def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) when not launched by it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes; True when this call created it."""
    import torch.distributed as dist

    _, world, _ = distributed_env()
    if world <= 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def _mean_across_ranks(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


# ---- the trainer ------------------------------------------------------------------------------------------------

def _atomic_torch_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class Trainer:
    """Train `model` on `batch_fn` batches; `save_fn(model, out_dir, card)` writes the checkpoint (rank 0)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, batch_fn: Callable[[int, int, int, int], dict], *,
                 out_dir: str | Path, loss_fn: Callable[[nn.Module, dict], torch.Tensor] = default_loss,
                 eval_fn: Callable[[nn.Module], dict] | None = None,
                 save_fn: Callable[[nn.Module, Path, dict], None] | None = None,
                 device: str | torch.device = "cpu", card: dict | None = None):
        cfg.validate()
        self.cfg, self.batch_fn, self.loss_fn, self.eval_fn = cfg, batch_fn, loss_fn, eval_fn
        self.save_fn = save_fn or (lambda m, path, card: m.save(path, card=card))
        self.out_dir = Path(out_dir)
        self.card = dict(card or {})
        self.rank, self.world_size, local_rank = distributed_env()
        device = torch.device(device)
        if device.type == "cuda" and self.world_size > 1:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        self.device = device
        self.created_group = init_distributed(device)
        self.model = model.to(device)
        self.module = self.model  # what batches run through: the DDP wrapper when distributed
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Buffers are synced once per step (`_sync_buffers`), not every forward: DDP's per-forward broadcast
            # would overwrite each rank's MoE load counters before they are all-reduced.
            self.module = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                              broadcast_buffers=False, find_unused_parameters=True)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.step = 0
        self.history: list[dict] = []

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync_buffers(self) -> None:
        """Rank 0's persistent buffers (batch-norm statistics, router biases) to every rank."""
        import torch.distributed as dist

        if self.world_size <= 1:
            return
        saved = set(self.model.state_dict())
        for name, buf in self.model.named_buffers():
            if name in saved:
                dist.broadcast(buf, src=0)

    # ---- state ----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "train_config": self.cfg.to_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}

    def save_state(self) -> Path:
        path = self.out_dir / STATE_FILE
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _atomic_torch_save(self.state_dict(), path)
        return path

    def load_state(self, path: str | Path | None = None) -> int:
        """Restore model, optimizer, scheduler, step and RNG from train_state.pt; returns the step."""
        path = Path(path) if path else self.out_dir / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no training state to resume from (train with --out {self.out_dir} "
                                    f"first, or drop --resume)")
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        random.setstate((3, tuple(state["rng"]["python"]), None))
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        return self.step

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    # ---- loop -----------------------------------------------------------------------------------------------------

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches; returns (mean loss, grad norm before clipping)."""
        cfg = self.cfg
        self.module.train()
        total = 0.0
        for micro in range(cfg.grad_accum):
            batch = self.batch_fn(self.step, micro, self.rank, self.world_size)
            last = micro == cfg.grad_accum - 1
            no_sync = self.module.no_sync() if self.module is not self.model and not last else contextlib.nullcontext()
            with no_sync:
                with self._autocast():
                    loss = self.loss_fn(self.module, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss is {loss.item()} at step {self.step}; lower "
                                             f"TrainConfig.lr (now {cfg.lr}) or check the data")
                (loss / cfg.grad_accum).backward()
            total += loss.item()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.model, "update_router_bias"):
            self.model.update_router_bias()
        self._sync_buffers()
        self.step += 1
        return total / cfg.grad_accum, grad_norm

    def evaluate(self) -> dict:
        """Run eval_fn on rank 0 (others wait); the metrics are logged and returned."""
        import torch.distributed as dist

        metrics = {}
        if self.eval_fn is not None and self.is_main:
            self.model.eval()
            metrics = dict(self.eval_fn(self.model))
            self._log({"step": self.step, "eval": metrics})
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
        return metrics

    def save(self, metrics: dict | None = None) -> None:
        """Checkpoint (rank 0) + train_state.pt; every rank waits for it."""
        import torch.distributed as dist

        if self.is_main:
            card = {**self.card, "steps": self.step, "train_config": self.cfg.to_dict(),
                    "world_size": self.world_size, "metrics": metrics or self.card.get("metrics", {})}
            # Wall time of this run's fit() so far (a resumed run counts from its restart) and where it ran.
            started = getattr(self, "_fit_started", None)
            if started is not None:
                card.update(train_seconds=round(time.perf_counter() - started, 1), device=str(self.device),
                            torch_threads=torch.get_num_threads())
            self.card = card
            self.save_fn(self.model, self.out_dir, card)
            self.save_state()
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()

    def fit(self, resume: bool = False) -> dict:
        """Train to cfg.steps; returns {"step", "loss", "eval": metrics}."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        if resume:
            self.load_state()
        else:
            torch.manual_seed(cfg.seed + self.rank)
            random.seed(cfg.seed + self.rank)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.is_main), desc="train",
                   dynamic_ncols=True)
        metrics, loss, started, window = {}, float("nan"), time.perf_counter(), []
        self._fit_started = started
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                loss, grad_norm = self.train_step()
                window.append(loss)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    mean_loss = _mean_across_ranks(sum(window) / len(window), self.device)
                    window = []
                    self._log({"step": self.step, "loss": round(mean_loss, 6), "lr": self.scheduler.get_last_lr()[0],
                               "grad_norm": round(grad_norm, 4), "step_s": round(time.perf_counter() - t0, 4),
                               "elapsed_s": round(time.perf_counter() - started, 2)})
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    metrics = self.evaluate()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save(metrics)
            metrics = self.evaluate()
            self.save(metrics)
        finally:
            bar.close()
            if self.created_group:
                torch.distributed.destroy_process_group()
        return {"step": self.step, "loss": loss, "eval": metrics}


# ---- recipes ----------------------------------------------------------------------------------------------------

class Recipe:
    """A named training setup: data, tokenizer, model, loss and evaluation.

    Subclass, override what differs, and register with `@register_recipe("name")`. Batches are a pure function of
    (step, micro, rank, world_size) so resumed and distributed runs see well-defined data. `options` come from
    `mmcore train NAME --option key=value` (strings; convert them in __init__); `data` from `--data PATH`.
    """

    name = ""
    description = ""

    def __init__(self, data: str | None = None, **options):
        if options:
            raise InputError(f"recipe {self.name!r}: unknown option(s) {sorted(options)}")
        self.data = data

    def train_config(self) -> TrainConfig:
        """This recipe's defaults; command-line flags override them."""
        return TrainConfig()

    def data_card(self) -> dict:
        """What the model is trained on, for card.json."""
        return {"training_data": self.description}

    def build_tokenizer(self, out_dir: Path):
        """A Tokenizer (or None). Called once per run; a resumed run reloads out_dir/tokenizer.json instead."""
        return None

    def build_model(self, tokenizer) -> nn.Module:
        raise NotImplementedError(f"recipe {self.name!r} does not define build_model")

    def batch(self, step: int, micro: int, rank: int, world_size: int, batch_size: int, tokenizer) -> dict:
        raise NotImplementedError(f"recipe {self.name!r} does not define batch")

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return default_loss(model, batch)

    def evaluate(self, model: nn.Module, tokenizer) -> dict:
        return {}

    def save(self, model: nn.Module, out_dir: Path, card: dict) -> None:
        model.save(out_dir, card=card)


RECIPES: dict[str, type[Recipe]] = {}


def register_recipe(name: str):
    """Class decorator: make a Recipe subclass available as `mmcore train NAME`."""
    def wrap(cls: type[Recipe]) -> type[Recipe]:
        if not (isinstance(cls, type) and issubclass(cls, Recipe)):
            raise TypeError(f"register_recipe({name!r}): expected a Recipe subclass, found {cls!r}")
        if name in RECIPES and RECIPES[name] is not cls:
            raise ValueError(f"register_recipe: the name {name!r} is already taken by {RECIPES[name].__qualname__}")
        cls.name = name
        RECIPES[name] = cls
        return cls
    return wrap


def get_recipe(name: str, data: str | None = None, **options) -> Recipe:
    """An instance of the recipe registered under `name`."""
    if name not in RECIPES:
        raise UnknownRecipe(f"recipe {name!r} is not registered; known recipes: {sorted(RECIPES) or 'none'}")
    return RECIPES[name](data=data, **options)


def run_recipe(recipe: Recipe | str, out_dir: str | Path, *, resume: bool = False, device: str | torch.device = "cpu",
               **overrides) -> dict:
    """Train a recipe into `out_dir` (overrides: TrainConfig fields); returns Trainer.fit's summary."""
    from mmcore.tokenizer import Tokenizer

    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    cfg = recipe.train_config()
    for key, value in overrides.items():
        if value is None:
            continue
        if not hasattr(cfg, key):
            raise ValueError(f"TrainConfig: unknown field {key!r}")
        setattr(cfg, key, value)
    cfg.validate()
    out_dir = Path(out_dir)
    if resume and not (out_dir / STATE_FILE).is_file():
        raise InputError(f"--resume: {out_dir / STATE_FILE} not found; nothing to resume")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
    if resume and (out_dir / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(out_dir / "tokenizer.json")
    else:
        tokenizer = recipe.build_tokenizer(out_dir)
    model = recipe.build_model(tokenizer)
    if tokenizer is not None and hasattr(model, "tokenizer"):
        model.tokenizer = tokenizer
    card = {"recipe": recipe.name, **recipe.data_card()}
    trainer = Trainer(model, cfg, lambda step, micro, rank, world: recipe.batch(step, micro, rank, world,
                                                                               cfg.batch_size, tokenizer),
                      out_dir=out_dir, loss_fn=recipe.loss, eval_fn=lambda m: recipe.evaluate(m, tokenizer),
                      save_fn=recipe.save, device=device, card=card)
    return trainer.fit(resume=resume)
