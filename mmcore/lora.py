"""LoRA adapters on attention projections and routed experts; train with the base frozen, ship the adapter alone.

W x + (alpha / rank) * B A x, with A (rank, in) small random and B (out, rank) zero, so a fresh adapter changes
nothing. Stacked experts get per-expert stacks A (E, rank, in) and B (E, out, rank); their low-rank deltas are added
to the stacked weights once per forward (E small bmm's), so every dispatch path sees adapted experts unchanged.
Parameter names of the base stay as they were (`...wq.weight`, `...experts.w13`), so a base checkpoint still loads.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from mmcore.errors import InputError
from mmcore.moe import Experts

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TARGETS = ("attention", "experts")
ATTENTION_PROJECTIONS = ("wq", "wk", "wv", "wo")


class AdapterError(InputError):
    """An adapter directory is missing, malformed or does not fit the model."""


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update; shares the base weight Parameter."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.scaling = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scaling * (self.lora_B @ self.lora_A)


class LoRAExperts(Experts):
    """Stacked experts with per-expert low-rank updates of w13 (E, 2H, D) and w2 (E, D, H)."""

    def __init__(self, base: Experts, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.dim, self.hidden, self.n_experts = base.dim, base.hidden, base.n_experts
        self.w13, self.w2 = base.w13, base.w2
        self.rank, self.scaling = rank, alpha / rank
        E, D, H, dev = self.n_experts, self.dim, self.hidden, base.w13.device
        self.lora_A13 = nn.Parameter(torch.empty(E, rank, D, device=dev))
        self.lora_B13 = nn.Parameter(torch.zeros(E, 2 * H, rank, device=dev))
        self.lora_A2 = nn.Parameter(torch.empty(E, rank, H, device=dev))
        self.lora_B2 = nn.Parameter(torch.zeros(E, D, rank, device=dev))
        for a in (self.lora_A13, self.lora_A2):
            nn.init.kaiming_uniform_(a.view(-1, a.size(-1)), a=math.sqrt(5))

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.w13 + self.scaling * torch.bmm(self.lora_B13, self.lora_A13),
                self.w2 + self.scaling * torch.bmm(self.lora_B2, self.lora_A2))


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16, targets=TARGETS) -> nn.Module:
    """Add LoRA adapters in place to attention projections and/or routed experts; returns the model."""
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"lora rank: expected a positive integer, found {rank!r}")
    unknown = set(targets) - set(TARGETS)
    if unknown or not targets:
        raise ValueError(f"lora targets: expected some of {TARGETS}, found {tuple(targets)!r}")
    swaps = []
    for name, module in model.named_modules():
        if isinstance(module, (LoRALinear, LoRAExperts)):
            raise ValueError(f"lora: {name} already carries an adapter")
        leaf = name.rpartition(".")[2]
        parent = name.rpartition(".")[0].rpartition(".")[2]
        if "attention" in targets and type(module) is nn.Linear and leaf in ATTENTION_PROJECTIONS and parent == "attn":
            swaps.append((name, LoRALinear(module, rank, alpha)))
        elif "experts" in targets and type(module) is Experts:
            swaps.append((name, LoRAExperts(module, rank, alpha)))
    if not swaps:
        raise ValueError(f"lora targets: no module of {tuple(targets)} found in {type(model).__name__}")
    for name, new in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    model._lora_config = {"rank": rank, "alpha": alpha, "targets": list(targets)}
    return model


def mark_only_lora_trainable(model: nn.Module) -> nn.Module:
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_" in name or name.startswith("lora_")
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items() if ".lora_" in k}


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write adapter.safetensors + adapter_config.json into `directory` (each via a temp file + rename)."""
    from safetensors.torch import save_file

    config = getattr(model, "_lora_config", None)
    state = lora_state_dict(model)
    if config is None or not state:
        raise ValueError("save_adapter: the model carries no LoRA adapter (call apply_lora first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in state.items()}
    _atomic_write(directory / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(directory / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the saved adapter's LoRA layout to a base model (if not applied yet) and load its weights."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise AdapterError(f"{directory / name}: adapter file not found (expected {ADAPTER_CONFIG} and "
                               f"{ADAPTER_WEIGHTS} written by save_adapter)")
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        rank, alpha, targets = int(config["rank"]), float(config["alpha"]), tuple(config["targets"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"{directory / ADAPTER_CONFIG}: expected JSON with rank, alpha, targets ({exc})") from exc
    if getattr(model, "_lora_config", None) is None:
        apply_lora(model, rank=rank, alpha=alpha, targets=targets)
    state = load_file(str(directory / ADAPTER_WEIGHTS))
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"{directory / ADAPTER_WEIGHTS}: does not fit this model; missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise AdapterError(f"{directory / ADAPTER_WEIGHTS}: {key} has shape {tuple(value.shape)}, the model "
                               f"expects {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=False)
    return model


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
