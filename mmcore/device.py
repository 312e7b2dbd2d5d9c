"""Device selection shared by every command that runs a model (`--device auto|cpu|cuda|cuda:N`)."""

from __future__ import annotations

from mmcore.errors import InputError

DEVICE_CHOICES_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N"


def resolve_device(name: str = "auto"):
    """Return a `torch.device`; `auto` picks CUDA when it is available."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"--device: expected {DEVICE_CHOICES_HELP}, got {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device: {name!r} was asked for but no CUDA device is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device: expected {DEVICE_CHOICES_HELP}, got {name!r}")
    return device
