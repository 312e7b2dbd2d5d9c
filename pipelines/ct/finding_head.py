"""What the volume encoder sees: a finding head on its tokens, and the "seen:" line it puts in the report prompt.

The volume encoder works on a coarse grid (pipelines.ct.report_model.GRID, ~5.6 mm voxels), where the large-scale
findings are visible: pleural effusions, pericardial effusion, emphysema, consolidation, cardiomegaly. A narrative
decoder left to find them in the bridge prefix by itself learns to copy the measured list and ignore the volume, so
the encoder states what it sees explicitly (a diagnosis-driven prompt): per-label probabilities from this head, cut
at thresholds chosen on validation phantoms, become the prompt's "seen:" line, which the decoder reports in words
without numbers (it has no measurement) and grounding marks as not confirmed by measurement.

The head reads the encoder's tokens position by position (each token narrowed to a few features, then one linear
map over all positions): where a finding lies is part of what it is (an effusion is dependent and basal, the heart is
anterior and left), and the right and left effusions are separate labels.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# (finding type, side) per label; side None where the finding has no side in the report.
SEEN_LABELS = (("pleural_effusion", "right"), ("pleural_effusion", "left"), ("pericardial_effusion", None),
               ("emphysema", None), ("consolidation", "right"), ("consolidation", "left"), ("cardiomegaly", None))
DEFAULT_THRESHOLD = 0.5
# A label whose best F1 on the validation phantoms stays below this is switched off (threshold None): the prompt
# would otherwise carry a guess, and the writer reports what the prompt says (consolidation at ~0.3 put a false
# consolidation in one report of five on held-out phantoms, where the measurement module finds it reliably).
MIN_SEEN_F1 = 0.8
FEATURES_PER_TOKEN = 8
TENSOR_PREFIX = "finding_head."  # names of the head's tensors in the checkpoint's extra tensors


class VolumeFindingHead(nn.Module):
    """(tokens (B, N, C), mask (B, N)) of the volume encoder -> (B, len(SEEN_LABELS)) logits; N is fixed by the
    model's grid (global tokens + patches)."""

    def __init__(self, dim: int, n_tokens: int, n_labels: int = len(SEEN_LABELS), width: int = FEATURES_PER_TOKEN):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.narrow = nn.Linear(dim, width)
        self.readout = nn.Linear(n_tokens * width, n_labels)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] * self.narrow.out_features != self.readout.in_features:
            raise ValueError(f"finding head: expected {self.readout.in_features // self.narrow.out_features} volume "
                             f"tokens (the model's grid), found {tokens.shape[1]}")
        x = self.narrow(self.norm(tokens)) * mask[..., None].to(tokens.dtype)  # (B, N, width); padding counts 0
        return self.readout(x.flatten(1))


def labels_of(findings: list[dict]) -> list[float]:
    """Ground-truth findings -> 0/1 per label of SEEN_LABELS."""
    present = {(f["type"], f.get("side") if side else None)
               for f in findings for kind, side in SEEN_LABELS if f["type"] == kind}
    return [float((kind, side) in present) for kind, side in SEEN_LABELS]


def seen_findings(probabilities, thresholds) -> list[dict]:
    """Per-label probabilities (len(SEEN_LABELS)) -> finding dicts for the prompt ({"type", "side"})."""
    return [{"type": kind, "side": side} for (kind, side), p, t in zip(SEEN_LABELS, probabilities, thresholds)
            if t is not None and float(p) >= float(t)]


def describe_seen(seen: list[dict] | None) -> str:
    """The prompt's "seen:" value: "pleural effusion right | cardiomegaly", "none", or "not assessed" (no volume)."""
    if seen is None:
        return "not assessed"
    return " | ".join(" ".join(p for p in (f["type"].replace("_", " "), f.get("side")) if p) for f in seen) or "none"


def head_tensors(head: VolumeFindingHead) -> dict[str, torch.Tensor]:
    return {TENSOR_PREFIX + name: t.detach() for name, t in head.state_dict().items()}


def load_head(extra_tensors: dict[str, torch.Tensor], dim: int) -> VolumeFindingHead | None:
    """The head stored in a checkpoint's extra tensors, or None when the checkpoint has none."""
    state = {k.removeprefix(TENSOR_PREFIX): v.float() for k, v in extra_tensors.items() if k.startswith(TENSOR_PREFIX)}
    if not state:
        return None
    width = state["narrow.weight"].shape[0]
    n_labels, features = state["readout.weight"].shape
    head = VolumeFindingHead(dim, features // width, n_labels, width)
    head.load_state_dict(state)
    return head.eval()


def best_thresholds(probabilities, targets) -> tuple[list[float | None], list[float | None]]:
    """Per label, the cut maximising F1 on a validation set ((N, L) arrays), at the middle of the best plateau, and
    that F1; DEFAULT_THRESHOLD (F1 None) where a label never occurs there, None (off) where the best F1 is below
    MIN_SEEN_F1."""
    import numpy as np

    p, y = np.asarray(probabilities, dtype=float), np.asarray(targets, dtype=float) >= 0.5
    grid = np.linspace(0.05, 0.95, 19)
    cuts, scores = [], []
    for k in range(p.shape[1]):
        if not y[:, k].any():
            cuts.append(DEFAULT_THRESHOLD)
            scores.append(None)
            continue
        predicted = p[:, k][:, None] >= grid[None, :]  # (N, cuts)
        true_pos = (predicted & y[:, k][:, None]).sum(0)
        f1 = 2 * true_pos / np.maximum(predicted.sum(0) + y[:, k].sum(), 1)
        best = np.flatnonzero(f1 >= f1.max() - 1e-9)
        scores.append(round(float(f1.max()), 4))
        cuts.append(round(float(grid[best[len(best) // 2]]), 3) if f1.max() >= MIN_SEEN_F1 else None)
    return cuts, scores
