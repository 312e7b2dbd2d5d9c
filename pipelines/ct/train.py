"""`mmcore train ct-report`: the report model on synthetic phantom studies (default) or on CT-RATE (`--data ROOT`).

Phantoms: rendered once per seed (`phantom_spec`: two scan lengths), reduced to the model's grid and cached on disk
with their ground truth (`--option cache=DIR`, default under ~/.cache/mmcore/ct-report/, see `default_cache`). Half
the seeds draw the realistic finding mix, half force a random set of findings so that rarer ones (consolidation,
cardiomegaly) are well represented.

Training has two phases in one run (`ReportTrainingModel`):
  1. findings (the first `findings_steps` steps): the volume encoder and its finding head
     (pipelines.ct.finding_head) learn which large-scale findings each grid shows, from the phantoms' ground truth;
  2. writer (the rest): the encoder and the head are frozen; the bridge and the core learn to write the narrative.
Each writer sample is one cached phantom seen through a simulated measurement module (sizes and volumes with
measurement noise, small nodules sometimes missed, an occasional false-positive nodule, consolidation and cardiomegaly
measured only sometimes) and a simulated finding head (the true large-scale findings, one now and then missed or
added), in one of two modes:
  - measured (1 - withheld): the prompt lists the simulated measurements and the seen findings; the target reports
    the measurements with their numbers and the seen findings nobody measured in words without numbers;
  - withheld: the prompt says "measured: withheld"; the target holds only the seen findings, without numbers. This
    mode is the encoder-only ablation `mmcore eval ct-report` measures.
The target follows the prompt, not the ground truth: the writer reports its inputs faithfully, and what the volume
adds is decided by the finding head, whose thresholds are chosen on validation phantoms at the end of the run.
A few samples (NO_VOLUME_RATE) come without the volume ("seen: not assessed").
Target wording comes from the reference-report grammar (pipelines.ct.reference_report), so it varies like the
reference reports do. The voice note enters as the indication text and, where a synthesised dictation of it exists
(espeak-ng and the offline Whisper model), as Whisper encoder features.

Options (`--option key=value`): phantoms (pool size), cache (folder), workers (processes rendering phantoms),
withheld (share of withheld-mode samples), audio (1/0: build the dictation pool), eval_phantoms (validation
phantoms checked after training; 0 skips the check), threshold_phantoms (validation phantoms the head's thresholds
are chosen on), init (continue from a report checkpoint: its weights, finding head and tokenizer), reinit (a comma
list of `bridge` and `volume`: fresh weights for those parts on top of `init`), findings_steps (steps of the findings phase; 0 keeps the head of `init`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from mmcore.errors import InputError
from mmcore.train import Recipe, TrainConfig, register_recipe
from pipelines.ct.finding_head import SEEN_LABELS, VolumeFindingHead, best_thresholds, head_tensors, labels_of
from pipelines.ct.phantom import FINDING_TYPES, PhantomConfig
from pipelines.ct.report_model import CHANNELS, GRID, HU_SCALE, prompt_order, prompt_text, target_text

TRAIN_SEED_BASE = 200_000  # training phantoms: seeds TRAIN_SEED_BASE .. + phantoms
VALID_SEED_BASE = 300_000  # the recipe's own end-of-training check and the finding head's thresholds
# `mmcore eval ct-report` uses seeds from pipelines.ct.report_eval.HELD_OUT_SEED_BASE (960000), never trained on.
LARGE_SCALE = ("pleural_effusion", "consolidation", "cardiomegaly", "emphysema")
# Phantom render settings for training: 128 x 128 pixels over 360 mm and 64 slices at 3.75 or 5 mm (240 or 320 mm
# of chest); the model sees them on GRID like any other series.
PHANTOM_SIZE, PHANTOM_SLICES, PHANTOM_THICKNESS_MM = 128, 64, (3.75, 5.0)
FORCE_RATE = 0.4  # with forced findings, each type is present with this probability

# Simulated measurement module (see module docstring): probabilities and noise scales.
KEEP_SMALL_NODULE, KEEP_NODULE, SMALL_NODULE_MM = 0.5, 0.93, 5.0
FALSE_NODULE_RATE = 0.25
KEEP_EFFUSION, KEEP_EMPHYSEMA = 0.92, 0.92
MEASURED_LARGE = 0.5  # consolidation / cardiomegaly listed in the prompt (the measurement module may report them)
SIZE_NOISE_REL, SIZE_NOISE_MM, VOLUME_NOISE_REL, LAA_NOISE_PP, CTR_NOISE = 0.05, 0.4, 0.10, 1.0, 0.015
# Simulated finding head: a true large-scale finding left out, a false one added (per sample).
SEEN_MISS, SEEN_FALSE = 0.08, 0.05
NO_VOLUME_RATE = 0.05
MAX_POS_WEIGHT = 4.0


def default_cache() -> Path:
    """$MMCORE_CACHE_DIR/ct-report/..., else $XDG_CACHE_HOME/mmcore/ct-report/..., else ~/.cache/mmcore/ct-report/..."""
    if os.environ.get("MMCORE_CACHE_DIR"):
        root = Path(os.environ["MMCORE_CACHE_DIR"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmcore"
    return root / "ct-report" / f"phantoms-{PHANTOM_SIZE}px-grid{'x'.join(map(str, GRID))}-{CHANNELS}ch"


def phantom_spec(seed: int) -> tuple[list[str] | None, PhantomConfig]:
    """Which findings a training seed forces (None: the realistic mix) and its render settings."""
    rng = np.random.default_rng([seed, 17])
    forced = None
    if rng.random() < 0.5:
        forced = [t for t in FINDING_TYPES if rng.random() < FORCE_RATE]
    thickness = float(PHANTOM_THICKNESS_MM[int(rng.integers(len(PHANTOM_THICKNESS_MM)))])
    return forced, PhantomConfig(size=PHANTOM_SIZE, slices=PHANTOM_SLICES, thickness_mm=thickness)


def render_case(seed: int, cache: Path) -> Path:
    """Render one phantom, reduce it to GRID and write `<seed>.npz` (grid: the model's channels times HU_SCALE as
    int16; ground truth JSON) atomically."""
    from pipelines.ct.phantom import make_phantom
    from pipelines.ct.report_model import volume_grid

    out = cache / f"{seed}.npz"
    if out.exists():
        return out
    forced, cfg = phantom_spec(seed)
    phantom = make_phantom(seed, forced, cfg)
    grid = (volume_grid(phantom.volume.hu) * HU_SCALE).round().to(torch.int16).numpy()
    truth = {"findings": phantom.ground_truth["findings"], "report": phantom.ground_truth["report"],
             "thickness_mm": cfg.thickness_mm}
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{seed}-", suffix=".npz")
    os.close(fd)
    try:
        np.savez(tmp, grid=grid, truth=np.array(json.dumps(truth)))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def ensure_cache(seeds: list[int], cache: Path, workers: int = 2, progress: bool = True) -> None:
    """Render every seed not yet in the cache, `workers` processes at a time."""
    cache.mkdir(parents=True, exist_ok=True)
    todo = [s for s in seeds if not (cache / f"{s}.npz").exists()]
    if not todo:
        return
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="phantoms", disable=not progress, unit="case")
    if workers <= 1:
        for s in todo:
            render_case(s, cache)
            bar.update()
    else:
        # Spawned workers: a forked child of a process whose torch thread pool is running can hang on its first
        # parallel operation (the recipe renders validation phantoms after training).
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for _ in pool.map(render_case, todo, [cache] * len(todo), chunksize=4):
                bar.update()
    bar.close()


def load_case(seed: int, cache: Path) -> tuple[np.ndarray, dict]:
    with np.load(cache / f"{seed}.npz") as data:
        return data["grid"], json.loads(str(data["truth"]))


# ------------------------------------------------------------------------------------------------- simulated measure

def simulate_measurements(truth: list[dict], rng: np.random.Generator) -> list[dict]:
    """Ground truth -> the measured findings for the prompt (ids M1, M2, ... in prompt order)."""
    measured = []

    def noisy(value, rel, absolute=0.0):
        return max(0.5, float(value) * (1 + rel * rng.standard_normal()) + absolute * rng.standard_normal())

    for f in truth:
        kind = f["type"]
        if kind in ("nodule", "calcified_granuloma"):
            keep = KEEP_SMALL_NODULE if f["diameter_mm"] < SMALL_NODULE_MM else KEEP_NODULE
            if rng.random() >= keep:
                continue  # a missed nodule
            long_ax = noisy(f["long_axis_mm"], SIZE_NOISE_REL, SIZE_NOISE_MM)
            short_ax = min(long_ax, noisy(f["short_axis_mm"], SIZE_NOISE_REL, SIZE_NOISE_MM))
            measured.append({**f, "long_axis_mm": long_ax, "short_axis_mm": short_ax,
                             "diameter_mm": (long_ax + short_ax) / 2})
        elif kind in ("pleural_effusion", "pericardial_effusion", "emphysema"):
            if rng.random() >= (KEEP_EMPHYSEMA if kind == "emphysema" else KEEP_EFFUSION):
                continue
            m = dict(f)
            if kind == "emphysema":
                m["laa950_percent"] = max(0.0, f["laa950_percent"] + LAA_NOISE_PP * rng.standard_normal())
            else:
                m["volume_ml"] = noisy(f["volume_ml"], VOLUME_NOISE_REL)
            measured.append(m)
        else:  # consolidation, cardiomegaly
            if rng.random() >= MEASURED_LARGE:
                continue
            m = dict(f)
            if kind == "consolidation":
                m["volume_ml"] = noisy(f["volume_ml"], VOLUME_NOISE_REL)
            else:
                m["cardiothoracic_ratio"] = float(f["cardiothoracic_ratio"]) + CTR_NOISE * rng.standard_normal()
            measured.append(m)
    if rng.random() < FALSE_NODULE_RATE:  # a false-positive candidate the model must still report (it was measured)
        d = float(rng.uniform(3.0, 7.0))
        lobe = str(rng.choice(["RUL", "RML", "RLL", "LUL", "LLL"]))
        measured.append({"type": "nodule", "composition": "solid", "lobe": lobe,
                         "side": "right" if lobe[0] == "R" else "left",
                         "diameter_mm": d, "long_axis_mm": d * 1.1, "short_axis_mm": d * 0.9})
    measured.sort(key=prompt_order)
    for i, m in enumerate(measured):
        m["id"] = f"M{i + 1}"
    return measured


def simulate_seen(truth: list[dict], rng: np.random.Generator) -> list[dict]:
    """Ground truth -> what a good finding head reports: its labels, each missed at SEEN_MISS, and now and then
    (SEEN_FALSE) a label that is not there."""
    present = labels_of(truth)
    seen = [k for k, p in enumerate(present) if p and rng.random() >= SEEN_MISS]
    absent = [k for k, p in enumerate(present) if not p]
    if absent and rng.random() < SEEN_FALSE:
        seen.append(int(rng.choice(absent)))
    return [{"type": SEEN_LABELS[k][0], "side": SEEN_LABELS[k][1]} for k in sorted(seen)]


def unmeasured_seen(seen: list[dict] | None, measured: list[dict]) -> list[dict]:
    """The seen findings no measurement covers (same type, and same side where the label has one), marked for
    number-free wording."""
    out = []
    for f in seen or []:
        if not any(m["type"] == f["type"] and (f["side"] is None or m.get("side") == f["side"]) for m in measured):
            out.append({**f, "lobe": None, "unmeasured": True})
    return out


def split_sections(sections: dict) -> tuple[str, str, str, str]:
    """Reference-report sections -> (lungs, pleura, heart, impression) texts."""
    text = sections["findings"]
    lungs, _, rest = text.partition(" Pleura: ")
    pleura, _, heart = rest.partition(" Heart and mediastinum: ")
    return lungs.removeprefix("Lungs: ").strip(), pleura.strip(), heart.strip(), sections["impression"].strip()


def text_findings(text: str) -> list[dict]:
    """The finding-head labels a report text asserts, as {"type", "side"} dicts (rule-based labeller): what a good
    head would see in a real study. An effusion or consolidation named without a side, or bilateral, counts on both
    sides."""
    from pipelines.ct.grounding import label_text

    out = []
    for m in label_text(text):
        if m.negated or not any(m.type == kind for kind, _ in SEEN_LABELS):
            continue
        sided = any(m.type == kind and side for kind, side in SEEN_LABELS)
        sides = [None] if not sided else [m.side] if m.side in ("right", "left") else ["right", "left"]
        out += [{"type": m.type, "side": side} for side in sides]
    return [dict(t) for t in {tuple(sorted(f.items())) for f in out}]


def case_findings(truth: dict) -> list[dict]:
    """Ground-truth findings of a phantom, or those its report text asserts for a real study."""
    return truth["findings"] if "findings" in truth else text_findings(truth["target"])


def write_target(findings: list[dict], rng: np.random.Generator) -> str:
    """The narrative for these findings: measured ones with their numbers, `unmeasured` ones in words."""
    from pipelines.ct.reference_report import reference_report

    sections = reference_report(findings, None, SimpleNamespace(thickness_mm=1.0), rng)
    return target_text(*split_sections(sections))


def sample_text(truth: dict, rng: np.random.Generator, withheld_rate: float,
                indications: list[str]) -> tuple[str, str, str | None, bool]:
    """(prompt, target, indication, with_volume) for one training view of a case (a phantom or a CT-RATE study)."""
    if "target" in truth:  # real data: the measurement module's findings and the radiologist's text
        indication = truth.get("indication") or None
        with_volume = rng.random() >= NO_VOLUME_RATE
        seen = case_findings(truth) if with_volume else None
        return prompt_text(truth["rows"], indication, seen), truth["target"], indication, with_volume
    withheld = rng.random() < withheld_rate
    with_volume = rng.random() >= NO_VOLUME_RATE
    measured = [] if withheld else simulate_measurements(truth["findings"], rng)
    seen = simulate_seen(truth["findings"], rng) if with_volume else None
    indication = str(rng.choice(indications)) if indications and rng.random() < 0.5 else None
    prompt = prompt_text(None if withheld else measured, indication, seen)
    return prompt, write_target(measured + unmeasured_seen(seen, measured), rng), indication, with_volume


# ---------------------------------------------------------------------------------------------------------- CT-RATE

# Sentence routing of free-text findings into the report's systems (CT-RATE findings are one paragraph).
SYSTEM_CUES = (
    ("pleura", ("pleura", "pneumothorax", "hydrothorax")),
    ("heart", ("heart", "cardi", "pericard", "aort", "mediastin", "lymph", "coronary", "esophag", "trachea")),
)


def route_sentences(findings: str) -> tuple[str, str, str]:
    """(lungs, pleura, heart) texts: each sentence goes to the first system whose cue it contains, else lungs."""
    from pipelines.ct.grounding import _sentences

    parts: dict[str, list[str]] = {"lungs": [], "pleura": [], "heart": []}
    for a, b in _sentences(findings):
        sentence = " ".join(findings[a:b].split())
        low = sentence.lower()
        key = next((k for k, cues in SYSTEM_CUES if any(c in low for c in cues)), "lungs")
        parts[key].append(sentence)
    return tuple(" ".join(v) or "Not described." for v in parts.values())


def ctrate_cases(root: str, cache: Path) -> list[tuple[np.ndarray, dict]]:
    """CT-RATE training studies as (grid, case) pairs: the grid, the measurement module's findings on the full
    volume (the prompt) and the radiologist's text routed into the target format. Cached per study; a study that
    cannot be read is skipped and reported, not fatal."""
    import hashlib
    import sys

    from pipelines.ct.dataset import CTRateDataset
    from pipelines.ct.measure import measure
    from pipelines.ct.report import measurements_from_findings
    from pipelines.ct.report_model import measurement_dicts, volume_grid

    dataset = CTRateDataset(root, "train")
    folder = cache / f"ctrate-{hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for study in dataset.studies:
        path = folder / f"{study.name}.npz"
        if not path.exists():
            try:
                volume = study.load()
            except Exception as exc:  # one unreadable volume never stops the run
                print(f"skipped {study.name}: {exc}", file=sys.stderr)
                continue
            grid = (volume_grid(volume.hu) * HU_SCALE).round().to(torch.int16).numpy()
            try:
                rows = measurement_dicts(measurements_from_findings(measure(volume).findings, volume.spacing_zyx))
            except Exception as exc:  # the study still trains the encoder and the text
                print(f"{study.name}: measurement failed ({exc}); trained without measurements", file=sys.stderr)
                rows = None
            case = {"rows": rows, "target": target_text(*route_sentences(study.findings), study.impression.strip()),
                    "indication": study.indication}
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".case-", suffix=".npz")
            os.close(fd)
            np.savez(tmp, grid=grid, truth=np.array(json.dumps(case, default=str)))
            os.replace(tmp, path)
        with np.load(path) as data:
            cases.append((data["grid"], json.loads(str(data["truth"]))))
    if not cases:
        raise InputError(f"--data {root}: no readable CT-RATE training study (skipped: {len(dataset.skipped)})")
    return cases


# ------------------------------------------------------------------------------------------------------ voice notes

def dictation_pool(cache: Path) -> dict[str, list[np.ndarray]]:
    """Whisper encoder features of each indication read in two voices; {} when espeak-ng or the offline speech model
    is missing (the model then trains without audio tokens, and its card says so)."""
    from pipelines.ct.reference_report import INDICATIONS

    out = cache / "dictations.npz"
    if out.exists():
        with np.load(out) as data:
            pool: dict[str, list[np.ndarray]] = {}
            for key in data.files:
                pool.setdefault(INDICATIONS[int(key.split("_")[0])], []).append(data[key])
            return pool
    try:
        from pipelines.speech.dictation import VOICES, espeak_path, synthesize
        from pipelines.speech.engines import load_transcriber

        if espeak_path() is None:
            return {}
        transcriber = load_transcriber("faster-whisper", device="cpu")
    except Exception:  # no speech stack here: train without audio rather than fail
        return {}
    arrays = {}
    for i, text in enumerate(INDICATIONS):
        for j, voice in enumerate(VOICES):
            arrays[f"{i}_{j}"] = transcriber.encode(synthesize(text, voice, 150)).astype(np.float16)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".dictations-", suffix=".npz")
    os.close(fd)
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    return dictation_pool(cache)


# ------------------------------------------------------------------------------------------------- training model

class ReportTrainingModel(torch.nn.Module):
    """The report model during training: the core and the volume encoder's finding head.

    Phase "findings" trains the volume encoder and the head on the findings' presence (binary cross-entropy per
    label of SEEN_LABELS); phase "writer" freezes both and trains the rest on the narrative. A decoder trained
    end to end learns to copy the measured list and leaves the volume unused (its bridge attention collapses onto
    the null token); a head trained on its own sees what the grid shows and says so in the prompt."""

    def __init__(self, core, head: VolumeFindingHead | None = None):
        super().__init__()
        self.core = core
        if head is None:
            volume = core.cfg.volume
            n_tokens = volume.n_global_tokens + int(np.prod([g // p for g, p in zip(GRID, volume.patch_size)]))
            head = VolumeFindingHead(core.encoders["volume"].out_dim, n_tokens)
        self.finding_head = head

    def update_router_bias(self) -> None:
        self.core.update_router_bias()

    def freeze_vision(self) -> None:
        """Writer phase: the volume encoder and the head keep what the findings phase taught them."""
        for module in (self.core.encoders["volume"], self.finding_head):
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, batch: dict):
        if batch["phase"] == "findings":
            inputs = batch["inputs"]
            tokens, mask = self.core.encoders["volume"](inputs["volume"].to(self.core.device),
                                                        inputs["volume_mask"].to(self.core.device))
            logits = self.finding_head(tokens, mask)
            return torch.nn.functional.binary_cross_entropy_with_logits(
                logits, batch["labels"].to(logits.device), pos_weight=batch["pos_weight"].to(logits.device))
        prefix, ids, mask = self.core._prefix_and_mask(batch["inputs"], batch["input_ids"], batch["attention_mask"])
        return self.core.lm(ids, prefix_embeds=prefix, attention_mask=mask, labels=batch["labels"].to(ids.device)).loss


def augment(grid: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """A cached int16 grid -> (CHANNELS, *GRID) float tensor with a +-1 voxel shift, and on the HU channel a small
    level offset and extra noise (the spread of scanners and reconstructions)."""
    x = torch.from_numpy(grid.astype(np.float32) / HU_SCALE)
    x = torch.roll(x, tuple(int(v) for v in rng.integers(-1, 2, size=3)), dims=(1, 2, 3))
    x[0] += float(rng.normal(0, 0.01)) + 0.01 * torch.from_numpy(rng.standard_normal(x.shape[1:], dtype=np.float32))
    return x


# ----------------------------------------------------------------------------------------------------------- recipe

@register_recipe("ct-report")
class CTReportRecipe(Recipe):
    description = ("synthetic chest CT phantoms (pipelines.ct.phantom; 128 x 128 x 64 slices at 3.75/5 mm, reduced to "
                   f"a {GRID[0]}x{GRID[1]}x{GRID[2]} grid) with simulated measurements and seen findings in the prompt "
                   "and reference-grammar Findings/Impression as targets")

    def __init__(self, data: str | None = None, phantoms: str | int = 1200, cache: str | None = None,
                 workers: str | int = 2, withheld: str | float = 0.3, audio: str | int = 1,
                 eval_phantoms: str | int = 24, threshold_phantoms: str | int = 200, init: str | None = None,
                 reinit: str = "", findings_steps: str | int = 600, **options):
        super().__init__(data, **options)
        self.init = Path(init) if init else None
        self.reinit = tuple(part for part in reinit.split(",") if part)
        if set(self.reinit) - {"bridge", "volume"}:
            raise InputError(f"--option reinit: expected a comma list of 'bridge' and 'volume', found {reinit!r}")
        self.n_phantoms, self.workers, self.eval_phantoms = int(phantoms), int(workers), int(eval_phantoms)
        self.threshold_phantoms = int(threshold_phantoms)
        self.findings_steps = int(findings_steps)
        if self.findings_steps < 0:
            raise InputError(f"--option findings_steps: expected 0 or more, found {findings_steps}")
        self.withheld_rate = float(withheld)
        if not 0 <= self.withheld_rate <= 1:
            raise InputError(f"--option withheld: expected a share in 0..1, found {withheld}")
        if self.n_phantoms < 8:
            raise InputError(f"--option phantoms: expected at least 8, found {phantoms}")
        self.cache = Path(cache) if cache else default_cache()
        self.use_audio = bool(int(audio))
        self.thresholds: list[float] | None = None  # chosen by `evaluate`, saved by `save`
        self.head_metrics: dict = {}
        self._cases: list[tuple[np.ndarray, dict]] | None = None
        self._pos_weight: torch.Tensor | None = None
        self._dictations: dict[str, list[np.ndarray]] | None = None

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=2400, batch_size=8, lr=2e-3, warmup_steps=100, weight_decay=0.05,
                           min_lr_ratio=0.05, log_every=20, seed=7)

    def data_card(self) -> dict:
        if self.data:
            return {"training_data": f"CT-RATE layout at {self.data} (train split)", "synthetic": False}
        pool = self.dictations()
        return {"training_data": self.description, "synthetic": True, "phantoms": self.n_phantoms,
                "phantom_seeds": [TRAIN_SEED_BASE, TRAIN_SEED_BASE + self.n_phantoms - 1],
                "withheld_share": self.withheld_rate, "findings_steps": self.findings_steps,
                "voice_notes": (f"{sum(len(v) for v in pool.values())} espeak-ng dictations of "
                                f"{len(pool)} indications, Whisper base encoder features") if pool else "none",
                "notice": "Demo weights trained on synthetic phantoms only. Not for diagnostic use."}

    # ---- data
    def cases(self) -> list[tuple[np.ndarray, dict]]:
        if self._cases is None and self.data:
            self._cases = ctrate_cases(self.data, self.cache)
        if self._cases is None:
            seeds = list(range(TRAIN_SEED_BASE, TRAIN_SEED_BASE + self.n_phantoms))
            ensure_cache(seeds, self.cache, self.workers)
            self._cases = [load_case(s, self.cache) for s in seeds]
        return self._cases

    def dictations(self) -> dict[str, list[np.ndarray]]:
        if self._dictations is None:
            self._dictations = dictation_pool(self.cache) if self.use_audio else {}
        return self._dictations

    def build_tokenizer(self, out_dir: Path):
        from mmcore.tokenizer import Tokenizer
        from pipelines.ct.reference_report import INDICATIONS

        if self.init is not None:  # continue from a checkpoint: its tokenizer, so its embeddings keep their meaning
            return Tokenizer.load(self.init)
        rng = np.random.default_rng(1)
        texts = []
        for _, truth in self.cases()[:400]:
            for _ in range(3):
                prompt, target, _, _ = sample_text(truth, rng, 0.2, list(INDICATIONS))
                texts += [prompt, target]
        return Tokenizer.train(texts, vocab_size=1024)

    def build_model(self, tokenizer):
        from mmcore.model import MultimodalModel
        from pipelines.ct.report_model import ReportModel, report_model_config

        head = None
        if self.init is not None:
            writer = ReportModel.load(self.init, device="cpu")
            core, head = writer.model.train(), writer.finding_head
            if "volume" in self.reinit:  # a fresh volume encoder (and head) of the current design
                from mmcore.encoders.volume import build_volume_encoder

                core.cfg.volume = report_model_config(tokenizer.vocab_size).volume
                core.encoders["volume"], head = build_volume_encoder(core.cfg.volume), None
            if head is not None:
                head.train()
                self.thresholds = writer.thresholds
            if core.cfg.lm.vocab_size != tokenizer.vocab_size:
                raise InputError(f"--option init={self.init}: its vocabulary ({core.cfg.lm.vocab_size}) differs from "
                                 f"the tokenizer's ({tokenizer.vocab_size})")
            if "bridge" in self.reinit:  # a bridge whose attention collapsed onto its null token passes no gradient
                from mmcore.bridge import CrossModalBridge

                core.bridge = CrossModalBridge(core.cfg.bridge, {n: e.out_dim for n, e in core.encoders.items()},
                                               core.cfg.lm.dim)
        else:
            core = MultimodalModel(report_model_config(tokenizer.vocab_size))
        if head is None and self.findings_steps == 0:
            raise InputError("--option findings_steps=0 keeps the finding head of --option init, but "
                             f"{self.init or 'no init checkpoint'} has none")
        core.tokenizer = tokenizer
        return ReportTrainingModel(core, head)

    def loss(self, model, batch: dict) -> torch.Tensor:
        if batch["phase"] == "writer" and model.finding_head.readout.weight.requires_grad:
            model.freeze_vision()
        return model(batch)

    def batch(self, step, micro, rank, world_size, batch_size, tokenizer) -> dict:
        from pipelines.ct.reference_report import INDICATIONS
        from pipelines.ct.report_model import model_inputs

        cases, pool = self.cases(), self.dictations()
        rng = np.random.default_rng([7, step, micro, rank])
        picks = [cases[int(i)] for i in rng.integers(len(cases), size=batch_size)]
        if step < self.findings_steps:
            return {"phase": "findings", "inputs": model_inputs([augment(grid, rng) for grid, _ in picks]),
                    "labels": torch.tensor([labels_of(case_findings(truth)) for _, truth in picks]),
                    "pos_weight": self.pos_weight()}
        grids, audio, prompts, targets = [], [], [], []
        for grid, truth in picks:
            prompt, target, indication, with_volume = sample_text(truth, rng, self.withheld_rate, list(INDICATIONS))
            grids.append(augment(grid, rng) if with_volume else None)
            notes = pool.get(indication) if indication else None
            audio.append(torch.from_numpy(notes[int(rng.integers(len(notes)))].astype(np.float32))
                         if notes and rng.random() < 0.5 else None)
            prompts.append(prompt)
            targets.append(target)
        return {"phase": "writer", "inputs": model_inputs(grids, audio if pool else None),
                **text_batch(tokenizer, prompts, targets)}

    def pos_weight(self) -> torch.Tensor:
        """Per label, the weight of positives in the findings loss: negatives / positives in the training pool,
        within 1..MAX_POS_WEIGHT (rare labels such as one side's consolidation would otherwise be learnt last)."""
        if self._pos_weight is None:
            rates = np.mean([labels_of(case_findings(truth)) for _, truth in self.cases()], axis=0)
            self._pos_weight = torch.tensor(np.clip((1 - rates) / np.maximum(rates, 1e-3), 1.0, MAX_POS_WEIGHT),
                                            dtype=torch.float32)
        return self._pos_weight

    # ---- evaluation and saving
    def choose_thresholds(self, model) -> None:
        """The head's per-label cuts, at the best F1 on `threshold_phantoms` validation phantoms (labels that stay
        below finding_head.MIN_SEEN_F1 are switched off); their F1 there goes in the card."""
        from pipelines.ct.report_model import model_inputs

        seeds = list(range(VALID_SEED_BASE, VALID_SEED_BASE + self.threshold_phantoms))
        ensure_cache(seeds, self.cache, self.workers, progress=False)
        probabilities, targets = [], []
        with torch.inference_mode():
            for start in range(0, len(seeds), 16):
                cases = [load_case(s, self.cache) for s in seeds[start:start + 16]]
                inputs = model_inputs([torch.from_numpy(g.astype(np.float32) / HU_SCALE) for g, _ in cases])
                tokens, mask = model.core.encoders["volume"](inputs["volume"], inputs["volume_mask"])
                probabilities.append(torch.sigmoid(model.finding_head(tokens, mask)).numpy())
                targets += [labels_of(t["findings"]) for _, t in cases]
        p, y = np.concatenate(probabilities), np.asarray(targets) >= 0.5
        self.thresholds, scores = best_thresholds(p, y)
        f1 = {"_".join(x for x in label if x): score for label, score in zip(SEEN_LABELS, scores)}
        self.head_metrics = {"finding_head_validation_f1": f1, "finding_head_validation_phantoms": len(seeds)}

    def evaluate(self, model, tokenizer) -> dict:
        """The head's thresholds (see `choose_thresholds`), then finding macro-F1, encoder-only F1 and BLEU on
        `eval_phantoms` validation phantoms (simulated measurements); the full evaluation is `mmcore eval ct-report`."""
        from pipelines.ct.report_eval import evaluate_cases
        from pipelines.ct.report_model import ReportModel

        model.eval()
        if self.threshold_phantoms > 0 and not self.data:  # also for a head kept from `init`: same cuts, same rule
            self.choose_thresholds(model)
        metrics = {}
        if self.eval_phantoms > 0:
            seeds = list(range(VALID_SEED_BASE, VALID_SEED_BASE + self.eval_phantoms))
            ensure_cache(seeds, self.cache, self.workers, progress=False)
            self.attach_head(model)
            writer = ReportModel(model.core)
            scores = evaluate_cases(writer, [load_case(s, self.cache) for s in seeds], seed=VALID_SEED_BASE)
            metrics = {k: scores[k] for k in ("finding_macro_f1", "encoder_only_f1", "bleu4", "rougeL")}
        model.train()
        return {**metrics, **self.head_metrics}

    def attach_head(self, model) -> None:
        """The head and its thresholds as the core's extra tensors and config, where `ReportModel` reads them."""
        model.core.extra_tensors = head_tensors(model.finding_head)
        labels = [[kind, side] for kind, side in SEEN_LABELS]
        model.core.extra_config = {**(model.core.extra_config or {}),
                                   "finding_head": {"labels": labels,
                                                    "thresholds": self.thresholds or [0.5] * len(SEEN_LABELS)}}

    def save(self, model, out_dir: Path, card: dict) -> None:
        self.attach_head(model)
        extra = {**model.core.extra_config, "task": "ct-report", "grid": list(GRID), "hu_clip": [-1000, 1000],
                 "hu_scale": HU_SCALE, "prompt": "measured: ... | seen: ... | indication: ... | report:",
                 "audio_features": "whisper-base encoder (512)"}
        card = {**card, "init": str(self.init) if self.init else None, "reinit": list(self.reinit)}
        model.core.save(out_dir, dtype=torch.float16, extra_config=extra, card=card)


def text_batch(tokenizer, prompts: list[str], targets: list[str]) -> dict:
    """<bos> prompt <sep> target <eos>, right-padded; the loss covers the target and <eos> only."""
    rows, spans = [], []
    for prompt, target in zip(prompts, targets):
        head = tokenizer.encode(prompt, add_bos=True) + [tokenizer.sep_id]
        tail = tokenizer.encode(target, add_bos=False, add_eos=True)
        rows.append(head + tail)
        spans.append(len(head))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, spans)):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, start:len(row)] = torch.tensor(row[start:])
        mask[i, :len(row)] = True
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
