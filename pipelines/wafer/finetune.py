"""Few-shot adaptation: learn a new pattern class from ~50 labelled maps with the base model frozen.

LoRA adapters go on the core's attention projections and routed experts (`mmcore.lora`); a new head row per new
class reads the adapted embedding. The timm encoder, the bridge and the original head stay frozen, and the original
outputs are held where they were by distillation on maps of the known classes (so adding a class does not move the
scores of the old ones). Negatives: the labelled maps without the new class plus generated maps of known classes.

An adapter folder holds adapter.safetensors + adapter_config.json (mmcore.lora) and fewshot_head.safetensors +
fewshot.json (new class names, the base checkpoint's model id). `WaferScorer(checkpoint, adapter=DIR)` loads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from pipelines.wafer.dataset import batch_input, synthetic_set
from pipelines.wafer.maps import WaferError, WaferMap, _atomic_write

HEAD_FILE, META_FILE = "fewshot_head.safetensors", "fewshot.json"


def _core_forward(net, tokens: torch.Tensor) -> torch.Tensor:
    """Embedding from precomputed (frozen) encoder tokens: bridge -> adapted core -> mean hidden state."""
    core = net.core
    mask = torch.ones(tokens.shape[:2], dtype=torch.bool)
    prefix = core.bridge({"image": (tokens, mask)})
    return core.lm.hidden_states(prefix).mean(1)


def finetune_new_classes(scorer, wafers: Sequence[WaferMap], *, steps: int = 150, rank: int = 4, lr: float = 3e-3,
                         n_negatives: int = 400, seed: int = 0, batch_size: int = 64) -> tuple[nn.Linear, list[str]]:
    """Adapt `scorer.net` in place (LoRA on its core) and return the new head and the new class names."""
    from mmcore.lora import apply_lora, mark_only_lora_trainable

    known = set(scorer.classes) | {"none"}
    new_classes = sorted({c for w in wafers for c in (w.labels or ()) if c not in known})
    if not new_classes:
        raise WaferError(f"few-shot data: no label outside the known classes {sorted(known)}; nothing new to learn")
    x_new = batch_input([w.grid for w in wafers], scorer.size)
    y_new = np.array([[c in (w.labels or ()) for c in new_classes] for w in wafers], dtype=np.float32)
    negatives = synthetic_set(n_negatives, 7_000 + seed, scorer.size, scorer.classes)
    x = torch.as_tensor(np.concatenate([x_new, negatives.inputs.astype(np.float32)]))
    y = torch.as_tensor(np.concatenate([y_new, np.zeros((len(negatives), len(new_classes)), np.float32)]))
    net = scorer.net
    net.eval()
    with torch.no_grad():
        tokens = torch.cat([net.core.encoders["image"](x[i:i + 256]) for i in range(0, len(x), 256)])
        old_logits = net.head(torch.cat([_core_forward(net, tokens[i:i + 256]) for i in range(0, len(x), 256)]))
    apply_lora(net.core, rank=rank, alpha=2 * rank)
    mark_only_lora_trainable(net.core)
    for p in net.head.parameters():
        p.requires_grad = False
    head = nn.Linear(net.head.in_features, len(new_classes))
    params = [p for p in net.core.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    # Positives are few: draw them at half of every batch.
    pos = torch.nonzero(y.sum(1) > 0).squeeze(1)
    neg = torch.nonzero(y.sum(1) == 0).squeeze(1)
    bce = nn.BCEWithLogitsLoss()
    for _ in range(steps):
        idx = torch.cat([pos[torch.randint(len(pos), (batch_size // 2,), generator=g)],
                         neg[torch.randint(len(neg), (batch_size - batch_size // 2,), generator=g)]])
        emb = _core_forward(net, tokens[idx])
        loss = bce(head(emb), y[idx]) + nn.functional.mse_loss(net.head(emb), old_logits[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    return head, new_classes


def save_fewshot(scorer, head: nn.Linear, classes: list[str], out_dir: str | Path, base_model_id: str) -> Path:
    from mmcore.lora import save_adapter

    out = Path(out_dir)
    save_adapter(scorer.net.core, out)
    tensors = {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}
    _atomic_write(out / HEAD_FILE, lambda f: f.write(_safetensors_bytes(tensors)))
    meta = {"classes": classes, "base_model": base_model_id}
    _atomic_write(out / META_FILE, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return out


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={"format": "pt"})


def load_fewshot(scorer, adapter_dir: str | Path) -> None:
    """Attach a saved adapter and its new classes to a loaded scorer."""
    from safetensors.torch import load_file

    from mmcore.lora import load_adapter

    path = Path(adapter_dir)
    for name in (HEAD_FILE, META_FILE):
        if not (path / name).is_file():
            raise WaferError(f"{path / name}: missing; not a wafer few-shot adapter folder "
                             f"(made by `mmcore finetune wafer --lora`)")
    meta = json.loads((path / META_FILE).read_text())
    load_adapter(scorer.net.core, path)
    state = load_file(str(path / HEAD_FILE))
    head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    scorer.attach_extra_head(head.to(scorer.device).eval(), list(meta["classes"]))


def fewshot_eval(checkpoint, *, seed: int = 10_003, n_shots: int = 50, n_test: int = 200, pattern: str = "Reticle",
                 steps: int = 150, device: str = "cpu") -> dict:
    """Learn `pattern` (absent from training) from `n_shots` generated maps; recall on `n_test` new maps of it and
    false positives on as many maps of known classes."""
    from pipelines.wafer.scoring import WaferScorer
    from pipelines.wafer.synth import generate

    scorer = WaferScorer(checkpoint, device=device)
    shots = list(generate(n_shots, seed, patterns=[(pattern,)]))
    head, classes = finetune_new_classes(scorer, shots, steps=steps, seed=seed)
    scorer.attach_extra_head(head, classes)
    test_new = [w.grid for w in generate(n_test, seed + 1, patterns=[(pattern,)])]
    test_known = [w.grid for w in generate(n_test, seed + 2)]
    p_new = scorer.score_grids(test_new).extra_probs[:, 0]
    p_known = scorer.score_grids(test_known).extra_probs[:, 0]
    return {"fewshot_recall": round(float((p_new >= 0.5).mean()), 4),
            "fewshot_false_positive": round(float((p_known >= 0.5).mean()), 4),
            "fewshot_class": pattern, "fewshot_shots": n_shots, "fewshot_steps": steps}

