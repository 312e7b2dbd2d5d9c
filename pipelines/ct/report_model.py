"""The report model: the `mmcore` core writing Findings and Impression from a CT volume, its measurements and the
voice note (tool-augmented generation).

Inputs to the core:
  - the volume, resampled to a fixed grid GRID (z, y, x) over the whole series in two channels (HU clipped to
    [-1000, 1000] and divided by 1000; the share of voxels below -950 HU, see `volume_grid`), through the 3D volume
    encoder (at 64 voxels over a 36 cm field a voxel is ~5.6 mm, so the
    encoder sees large-scale findings: effusions, consolidation, heart size, emphysema; a 5 mm nodule is one voxel);
  - the measured findings as structured text in the prompt ("measured: M1 nodule solid RUL 12x9 mm mean 10 mm | ..."),
    so the narrative reports what the measurement module found with its numbers;
  - what the volume encoder sees, from its finding head (pipelines.ct.finding_head), as the prompt's "seen:" line
    ("seen: pleural effusion right | cardiomegaly"): large-scale findings the narrative reports in words;
  - the voice note: its transcript as the prompt's indication, and the Whisper encoder's features as audio tokens.
The model writes "lungs: ... | pleura: ... | heart: ... | impression: ..." which `parse_narrative` splits into the
report's sections; grounding (pipelines.ct.grounding) then checks the text against the measurements.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.ct.errors import CTError

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "data" / "checkpoints" / "ct-report"
GRID = (64, 64, 64)  # (z, y, x) voxels the volume encoder sees
HU_CLIP = (-1000.0, 1000.0)
HU_SCALE = 1000.0
LAA_HU = -950.0  # low-attenuation threshold of the second channel (%LAA-950, the CT emphysema index)
CHANNELS = 2
MAX_INDICATION_CHARS = 240  # longer dictations keep their first sentences in the prompt (the transcript is kept whole)
MAX_AUDIO_FRAMES = 2048 * 8  # Whisper frames (20 ms) the bridge's audio positions cover at pool stride 8 (~5.4 min)
MAX_NEW_TOKENS = 320
# Measured findings listed in the prompt: the first ones in TYPE_ORDER, largest first. More than this (a scan with
# many nodules) are not shown to the model; grounding flags each of them as measured but not mentioned.
MAX_PROMPT_FINDINGS = 12
WITHHELD = "withheld"  # the prompt's measured list when measurements are deliberately kept from the model
# Section keys the model writes, and the report fields they fill.
SECTIONS = {"lungs": "lungs_airways", "pleura": "pleura", "heart": "heart_pericardium", "impression": "impression"}
NOT_ASSESSED = "Not assessed by automated measurement."
TYPE_ORDER = ("nodule", "calcified_granuloma", "pleural_effusion", "pericardial_effusion", "emphysema",
              "consolidation", "cardiomegaly")


class ReportModelError(CTError):
    """A report checkpoint that cannot be loaded, or model output that cannot be used."""


# ------------------------------------------------------------------------------------------------------------ inputs

def volume_grid(hu: np.ndarray, grid: tuple[int, int, int] = GRID):
    """(Z, Y, X) HU array -> (CHANNELS, *grid) float32 tensor: channel 0 the HU clipped to HU_CLIP and divided by
    HU_SCALE (in [-1, 1]), channel 1 the share of voxels below LAA_HU (in [0, 1]). Area-averaged where the grid is
    coarser (noise averages out as in a thick reconstruction), trilinear where it is finer. The second channel keeps
    what averaging loses: emphysema is a share of very low voxels, which moves a 5.6 mm cell's mean by a few HU
    only."""
    import torch
    import torch.nn.functional as F

    if hu.ndim != 3 or min(hu.shape) < 2:
        raise ReportModelError(f"volume: expected a 3-D HU array with at least 2 voxels per axis, found shape "
                               f"{hu.shape}")
    raw = torch.from_numpy(np.ascontiguousarray(hu))
    low = (raw < LAA_HU).to(torch.float32)[None, None]
    x = raw.to(torch.float32).clamp_(*HU_CLIP).div_(HU_SCALE)[None, None]  # (1, 1, Z, Y, X)
    pooled = tuple(min(n, g) for n, g in zip(x.shape[2:], grid))
    channels = []
    for c in (x, low):
        if pooled != tuple(c.shape[2:]):
            c = F.adaptive_avg_pool3d(c, pooled)
        if pooled != tuple(grid):
            c = F.interpolate(c, size=grid, mode="trilinear", align_corners=False)
        channels.append(c[0, 0])
    return torch.stack(channels)


def _number(value, fmt: str) -> str:
    return format(float(value), fmt)


def describe_measurement(m: dict) -> str:
    """One prompt item for a measured finding dict (report `Measurement` fields; `type` may be a calcified nodule)."""
    kind = m.get("kind") or m["type"]
    if kind == "nodule" and (m.get("composition") or "") == "calcified":
        kind = "calcified_granuloma"
    where = m.get("lobe") or m.get("side") or ""
    parts = [m.get("id", ""), kind.replace("_", " ")]
    if kind == "nodule":
        parts.append(m.get("composition") or "solid")
        parts.append(where)
        if m.get("long_axis_mm") and m.get("short_axis_mm"):
            parts.append(f"{_number(m['long_axis_mm'], '.0f')}x{_number(m['short_axis_mm'], '.0f')} mm")
        parts.append(f"mean {_number(m.get('diameter_mm') or 0, '.0f')} mm")
    elif kind == "calcified_granuloma":
        parts += [where, f"{_number(m.get('diameter_mm') or 0, '.0f')} mm"]
    elif kind in ("pleural_effusion", "pericardial_effusion", "consolidation"):
        if kind != "pericardial_effusion":
            parts.append(where)
        parts.append(f"{_number(m.get('volume_ml') or 0, '.0f')} mL")
    elif kind == "emphysema":
        parts.append(f"LAA {_number(m.get('laa950_percent') or 0, '.0f')}%")
    elif kind == "cardiomegaly":
        ratio = m.get("cardiothoracic_ratio")
        if ratio is not None:
            parts.append(f"CTR {_number(ratio, '.2f')}")
    return " ".join(p for p in parts if p)


def prompt_order(m: dict):
    """Sort key of a measured finding in the prompt: TYPE_ORDER, then largest first."""
    kind = m.get("kind") or m["type"]
    if kind == "nodule" and (m.get("composition") or "") == "calcified":
        kind = "calcified_granuloma"
    return TYPE_ORDER.index(kind), -(m.get("diameter_mm") or m.get("volume_ml") or 0.0)


def prompt_text(measurements: list[dict] | None, indication: str | None = None,
                seen: list[dict] | None = None) -> str:
    """The structured prompt: measured findings (None = withheld), what the volume encoder sees (None = not
    assessed: no volume, or a checkpoint without a finding head) and the dictated indication."""
    from pipelines.ct.finding_head import describe_seen

    if measurements is None:
        measured = WITHHELD
    else:
        listed = sorted(measurements, key=prompt_order)[:MAX_PROMPT_FINDINGS]
        measured = " | ".join(describe_measurement(m) for m in listed) or "none"
    note = " ".join((indication or "").split())
    if len(note) > MAX_INDICATION_CHARS:
        note = note[:MAX_INDICATION_CHARS].rsplit(" ", 1)[0]
    return f"measured: {measured}\nseen: {describe_seen(seen)}\nindication: {note or 'none'}\nreport:"


def target_text(lungs: str, pleura: str, heart: str, impression: str) -> str:
    """What the model learns to write (and `parse_narrative` reads back)."""
    return f"lungs: {lungs} | pleura: {pleura} | heart: {heart} | impression: {impression}"


def parse_narrative(text: str):
    """Model output -> (Findings, impression). Missing sections stay empty and are reported as missing."""
    from pipelines.ct.report import Findings

    values: dict[str, str] = {}
    for part in text.split(" | "):
        key, sep, value = part.partition(":")
        key = key.strip().lower()
        if sep and key in SECTIONS and key not in values:
            values[key] = value.strip()
    missing = [k for k in SECTIONS if not values.get(k)]
    findings = Findings(lungs_airways=values.get("lungs", ""), pleura=values.get("pleura", ""),
                        heart_pericardium=values.get("heart", ""), mediastinum_lymph_nodes=NOT_ASSESSED,
                        bones_chest_wall=NOT_ASSESSED, upper_abdomen=NOT_ASSESSED)
    return findings, values.get("impression", ""), missing


# ------------------------------------------------------------------------------------------------------------- model

def report_model_config(vocab_size: int):
    """The demo report model: a 3D window encoder on GRID (8 x 8 x 8 patches of 8^3 voxels, ~45 mm each), audio
    features from Whisper base (512 wide), a one-layer bridge of 16 queries and a small MoE core; sized so the
    demo weights train on 2 CPU cores in well under two hours."""
    from mmcore.config import (AudioEncoderConfig, BridgeConfig, LMConfig, ModelConfig, MoEConfig,
                               VolumeEncoderConfig)

    cfg = ModelConfig(
        lm=LMConfig(vocab_size=vocab_size, dim=192, n_layers=3, n_heads=6, n_kv_heads=2, n_dense_layers=1,
                    dense_hidden=512, max_seq_len=640,
                    moe=MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=192)),
        bridge=BridgeConfig(dim=192, n_queries=16, n_layers=1, n_heads=6, max_tokens_per_modality=2048),
        volume=VolumeEncoderConfig(in_chans=CHANNELS, dim=96, depth=2, n_heads=4, patch_size=(8, 8, 8),
                                   window_size=(2, 4, 4),
                                   n_global_tokens=4, mlp_ratio=2.0,
                                   max_grid=(GRID[0] // 8, GRID[1] // 8, GRID[2] // 8)),
        audio=AudioEncoderConfig(source="features", feature_dim=512, pool_stride=8),
    )
    cfg.validate()
    return cfg


def model_inputs(grids: list, audio: list | None = None) -> dict:
    """Batch the encoder inputs: grids (CHANNELS, *GRID) tensors or None (no volume); audio (T, 512) tensors or
    None."""
    import torch

    B = len(grids)
    volume = torch.zeros(B, CHANNELS, *GRID)
    volume_mask = torch.zeros(B, GRID[0], dtype=torch.bool)
    for i, g in enumerate(grids):
        if g is not None:
            volume[i] = g
            volume_mask[i] = True
    inputs = {"volume": volume, "volume_mask": volume_mask}
    if audio is not None and any(a is not None for a in audio):
        frames = max(min(a.shape[0], MAX_AUDIO_FRAMES) for a in audio if a is not None)
        width = next(a.shape[1] for a in audio if a is not None)
        feats = torch.zeros(B, frames, width)
        mask = torch.zeros(B, frames, dtype=torch.bool)
        for i, a in enumerate(audio):
            if a is not None:
                n = min(a.shape[0], frames)
                feats[i, :n] = torch.as_tensor(a[:n], dtype=torch.float32)
                mask[i, :n] = True
        inputs.update(audio=feats, audio_mask=mask)
    return inputs


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Draft:
    findings: object  # pipelines.ct.report.Findings
    impression: str
    text: str  # the raw model output
    missing_sections: list[str]
    seconds: float
    seen: list[dict] | None = None  # what the volume encoder's finding head reported (None: not assessed)


class ReportModel:
    """A trained report checkpoint (data/checkpoints/ct-report/ or any `mmcore train ct-report` output)."""

    def __init__(self, model, path: Path | None = None, sha256: str = ""):
        if model.tokenizer is None:
            raise ReportModelError(f"{path or 'report model'}: the checkpoint has no tokenizer.json")
        if "volume" not in model.encoders:
            raise ReportModelError(f"{path or 'report model'}: not a report model (its config has no volume encoder)")
        self.model = model.eval()
        self.tokenizer = model.tokenizer
        self.path = path
        self.sha256 = sha256
        self.card = dict(model.card)
        from pipelines.ct.finding_head import SEEN_LABELS, load_head

        self.finding_head = load_head(model.extra_tensors, model.encoders["volume"].out_dim)
        if self.finding_head is not None:
            self.finding_head.to(model.device)
        cuts = (model.extra_config or {}).get("finding_head", {}).get("thresholds")
        self.thresholds = list(cuts) if cuts else [0.5] * len(SEEN_LABELS)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "ReportModel":
        from mmcore.checkpoint import load_model
        from mmcore.device import resolve_device

        path = Path(path)
        try:
            model = load_model(path, device=resolve_device(str(device)))
        except (FileNotFoundError, ValueError) as exc:
            raise ReportModelError(f"{path}: cannot load the report model ({exc})") from exc
        if (model.extra_config or {}).get("task") != "ct-report":
            raise ReportModelError(f"{path}: not a ct-report checkpoint (config.json extra.task is "
                                   f"{(model.extra_config or {}).get('task')!r})")
        return cls(model, path, file_sha256(path / "model.safetensors"))

    @property
    def model_id(self) -> str:
        return f"ct-report@{self.sha256[:12]}" if self.sha256 else "ct-report"

    def info(self):
        """The report's `model` field for drafts written by this checkpoint."""
        from pydicom.uid import generate_uid

        from pipelines.ct.report import ModelInfo

        return ModelInfo(id=self.model_id, checkpoint_sha256=self.sha256,
                         device_uid=generate_uid(entropy_srcs=[self.sha256 or self.model_id]),
                         demo=bool(self.card.get("synthetic", True)))

    def write(self, grids: list, measurements: list[list[dict] | None], indications: list[str | None],
              audio: list | None = None, max_new_tokens: int = MAX_NEW_TOKENS) -> list[Draft]:
        """Greedy narratives for a batch: grids from `volume_grid` (None = no volume), measurement dicts per study
        (None = withheld), indication text per study, optional Whisper features per study."""
        import torch

        start = time.perf_counter()
        tok = self.tokenizer
        seen = self.see(grids)
        prompts = [prompt_text(m, ind, s) for m, ind, s in zip(measurements, indications, seen)]
        ids, mask = tok.batch_encode(prompts, add_bos=True, padding_side="left")
        ids = torch.cat([ids, torch.full((len(prompts), 1), tok.sep_id)], 1)
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.bool)], 1)
        # The prefix (bridge queries) and the prompt share the context with the narrative.
        room = self.model.cfg.lm.max_seq_len - self.model.cfg.bridge.n_queries - ids.shape[1]
        if room < 16:
            raise ReportModelError(f"prompt: {ids.shape[1]} tokens leave no room for a narrative within "
                                   f"max_seq_len={self.model.cfg.lm.max_seq_len}")
        with torch.inference_mode():
            out = self.model.generate(model_inputs(grids, audio), ids, attention_mask=mask,
                                      max_new_tokens=min(max_new_tokens, room), stop_tokens=(tok.eos_id,),
                                      pad_id=tok.pad_id)
        seconds = (time.perf_counter() - start) / max(len(prompts), 1)
        drafts = []
        for row in out:
            text = tok.decode(row).strip()
            findings, impression, missing = parse_narrative(text)
            drafts.append(Draft(findings, impression, text, missing, seconds, seen[len(drafts)]))
        return drafts

    def see(self, grids: list) -> list[list[dict] | None]:
        """What the finding head sees in each grid (None where there is no grid or no head)."""
        import torch

        from pipelines.ct.finding_head import seen_findings

        present = [i for i, g in enumerate(grids) if g is not None]
        out: list[list[dict] | None] = [None] * len(grids)
        if self.finding_head is None or not present:
            return out
        inputs = model_inputs([grids[i] for i in present])
        with torch.inference_mode():
            tokens, mask = self.model.encoders["volume"](inputs["volume"].to(self.model.device),
                                                         inputs["volume_mask"].to(self.model.device))
            probabilities = torch.sigmoid(self.finding_head(tokens, mask)).cpu().numpy()
        for i, p in zip(present, probabilities):
            out[i] = seen_findings(p, self.thresholds)
        return out

    def write_one(self, grid, measurements: list[dict] | None, indication: str | None = None,
                  audio=None) -> Draft:
        return self.write([grid], [measurements], [indication], None if audio is None else [audio])[0]


def measurement_dicts(measurements) -> list[dict]:
    """Report `Measurement` rows -> prompt dicts (their kind, id and values)."""
    return [{**m.model_dump(), "kind": m.kind} for m in measurements]
