"""Checkpoint directory: config.json, model.safetensors, tokenizer.json, card.json.

config.json   {"format": "mmcore", "version": 1, "storage_dtype": ..., "model": ModelConfig, "extra": {...}}
              "extra" holds keys a downstream user added (e.g. the classes of a head built beside the core).
model.safetensors  every weight; tensors saved with `extra_tensors` are stored under "extra." and come back as
              `model.extra_tensors`. fp16 storage halves the file; weights load back into fp32 for CPU compute.
tokenizer.json     the byte-level BPE tokenizer (when the model has one).
card.json     what the weights are: training data, recipe, steps, metrics, code commit, parameter count.
Each file is written under a temporary name and renamed into place, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

FORMAT, VERSION = "mmcore", 1
EXTRA_PREFIX = "extra."
FILES = ("config.json", "model.safetensors", "tokenizer.json", "card.json")


def git_commit() -> str | None:
    """The code's commit (`git rev-parse HEAD`), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip() if out.returncode == 0 else ""
    return commit or None


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _storage_tensors(model, dtype, extra_tensors) -> dict[str, torch.Tensor]:
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if t.data_ptr() in seen:  # safetensors refuses shared storage
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[name] = t.contiguous()
    for name, t in (extra_tensors or {}).items():
        if not torch.is_tensor(t):
            raise ValueError(f"extra_tensors[{name!r}]: expected a tensor, found {type(t).__name__}")
        t = t.detach().cpu()
        tensors[EXTRA_PREFIX + name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).clone()
    return tensors


def save_model(model, path: str | Path, *, dtype: torch.dtype | None = None, extra_config: dict | None = None,
               extra_tensors: dict[str, torch.Tensor] | None = None, card: dict | None = None) -> Path:
    """Write `model` (a MultimodalModel) as a checkpoint into directory `path` (its checkpoint files are replaced)."""
    from safetensors.torch import save_file

    if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype: expected None, torch.float32, torch.float16 or torch.bfloat16, found {dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra_config = dict(model.extra_config if extra_config is None else extra_config)
    extra_tensors = getattr(model, "extra_tensors", None) if extra_tensors is None else extra_tensors
    storage = str(dtype or torch.float32).removeprefix("torch.")
    config = {"format": FORMAT, "version": VERSION, "storage_dtype": storage, "model": model.cfg.to_dict(),
              "extra": extra_config}
    json.dumps(config)  # extra_config must be JSON: fail before anything is written
    full_card = {**model.card, **(card or {})}
    full_card.update(commit=git_commit() or full_card.get("commit"), storage_dtype=storage,
                     parameters=model.num_params(),
                     saved_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    path.mkdir(parents=True, exist_ok=True)
    # Every file is written under a temporary name first, then all are renamed into place: a crash never leaves
    # a half-written file, and other files in the directory (training state, metrics logs) are left alone.
    staged: dict[str, Path] = {}
    try:
        for name in FILES:
            if name == "tokenizer.json" and model.tokenizer is None:
                continue
            fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{name}-")
            os.close(fd)
            staged[name] = Path(tmp)
            if name == "config.json":
                _write_json(staged[name], config)
            elif name == "model.safetensors":
                save_file(_storage_tensors(model, dtype, extra_tensors), tmp, metadata={"format": "pt"})
            elif name == "tokenizer.json":
                model.tokenizer.save(staged[name])
            else:
                _write_json(staged[name], full_card)
        for name, tmp in staged.items():
            os.replace(tmp, path / name)
        if model.tokenizer is None and (path / "tokenizer.json").exists():
            (path / "tokenizer.json").unlink()  # a stale tokenizer would not belong to these weights
    finally:
        for tmp in staged.values():
            if tmp.exists():
                tmp.unlink()
    return path


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory not found (expected {', '.join(FILES)})")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing; not an mmcore checkpoint directory")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT or "model" not in config:
        raise ValueError(f"{config_file}: expected an mmcore checkpoint config with 'format': 'mmcore' and a "
                         f"'model' section")
    if config.get("version", 0) > VERSION:
        raise ValueError(f"{config_file}: checkpoint version {config['version']} is newer than this mmcore "
                         f"reads ({VERSION})")
    return config


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the MultimodalModel saved at `path`: fp32 weights on `device`, tokenizer, extra config and card."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mmcore.config import ModelConfig
    from mmcore.model import MultimodalModel
    from mmcore.tokenizer import Tokenizer

    path = Path(path)
    config = read_config(path)
    cfg = ModelConfig.from_dict(config["model"])
    model = MultimodalModel(cfg, load_pretrained=False)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing; the checkpoint has no weights")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights}: not a readable safetensors file ({exc})") from exc
    extra = {k[len(EXTRA_PREFIX):]: v.float() if v.is_floating_point() else v
             for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        more = lambda names: "..." if len(names) > 5 else ""  # noqa: E731
        raise ValueError(f"{weights}: weights do not match config.json (missing {missing[:5]}{more(missing)}, "
                         f"unexpected {unexpected[:5]}{more(unexpected)})")
    expected = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{weights}: weights do not match config.json (shapes stored vs configured: "
                         f"{', '.join(wrong[:3])}{'...' * (len(wrong) > 3)})")
    model.load_state_dict(state, strict=True)  # copies into the fp32 parameters: fp16 storage, fp32 compute
    model.extra_config = dict(config.get("extra") or {})
    model.extra_tensors = extra
    if (path / "tokenizer.json").is_file():
        model.tokenizer = Tokenizer.load(path / "tokenizer.json")
    if (path / "card.json").is_file():
        try:
            model.card = json.loads((path / "card.json").read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path / 'card.json'}: not valid JSON ({exc})") from exc
    return model.to(device).eval()
