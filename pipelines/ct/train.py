"""`mmcore train ct-report`: the report model on synthetic phantom studies (default) or on CT-RATE (`--data ROOT`).

Phantoms: rendered once per seed (`phantom_spec`: two scan lengths), reduced to the model's grid and cached on disk
with their ground truth (`--option cache=DIR`, default under ~/.cache/mmcore/ct-report/, see `default_cache`). Half
the seeds draw the realistic finding mix, half force a random set of findings so that rarer ones (consolidation,
cardiomegaly) are well represented.

Each training sample is one cached phantom seen through a simulated measurement module (sizes and volumes with
measurement noise, small nodules sometimes missed, an occasional false-positive nodule, consolidation and cardiomegaly
measured only sometimes) in one of two modes:
  - measured (80%): the prompt lists the simulated measurements; the target reports them with their numbers, and
    reports the large-scale findings the prompt does not list in words without numbers (what the encoder sees);
  - withheld (20%): the prompt says "measured: withheld"; the target holds only the large-scale findings, without
    numbers. This mode is the encoder-only ablation `mmcore eval ct-report` measures.
Target wording comes from the reference-report grammar (pipelines.ct.reference_report), so it varies like the
reference reports do. The voice note enters as the indication text and, where a synthesised dictation of it exists
(espeak-ng and the offline Whisper model), as Whisper encoder features.

Options (`--option key=value`): phantoms (pool size), cache (folder), workers (processes rendering phantoms),
withheld (share of withheld-mode samples), audio (1/0: build the dictation pool), eval_phantoms (validation
phantoms checked after training; 0 skips the check), init (continue from a report checkpoint: its weights and
tokenizer), reinit (`bridge`: fresh bridge weights on top of `init`), aux_weight (weight of the finding-presence
loss on the bridge prefix, see `ReportTrainingModel`).
"""

from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from mmcore.errors import InputError
from mmcore.train import Recipe, TrainConfig, register_recipe
from pipelines.ct.phantom import FINDING_TYPES, PhantomConfig
from pipelines.ct.report_model import GRID, HU_SCALE, prompt_order, prompt_text, target_text

TRAIN_SEED_BASE = 200_000  # training phantoms: seeds TRAIN_SEED_BASE .. + phantoms
VALID_SEED_BASE = 300_000  # the recipe's own end-of-training check
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


def default_cache() -> Path:
    """$MMCORE_CACHE_DIR/ct-report/..., else $XDG_CACHE_HOME/mmcore/ct-report/..., else ~/.cache/mmcore/ct-report/..."""
    if os.environ.get("MMCORE_CACHE_DIR"):
        root = Path(os.environ["MMCORE_CACHE_DIR"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmcore"
    return root / "ct-report" / f"phantoms-{PHANTOM_SIZE}px-grid{'x'.join(map(str, GRID))}"


def phantom_spec(seed: int) -> tuple[list[str] | None, PhantomConfig]:
    """Which findings a training seed forces (None: the realistic mix) and its render settings."""
    rng = np.random.default_rng([seed, 17])
    forced = None
    if rng.random() < 0.5:
        forced = [t for t in FINDING_TYPES if rng.random() < FORCE_RATE]
    thickness = float(PHANTOM_THICKNESS_MM[int(rng.integers(len(PHANTOM_THICKNESS_MM)))])
    return forced, PhantomConfig(size=PHANTOM_SIZE, slices=PHANTOM_SLICES, thickness_mm=thickness)


def render_case(seed: int, cache: Path) -> Path:
    """Render one phantom, reduce it to GRID and write `<seed>.npz` (grid int16 HU, ground truth JSON) atomically."""
    from pipelines.ct.phantom import make_phantom
    from pipelines.ct.report_model import volume_grid

    out = cache / f"{seed}.npz"
    if out.exists():
        return out
    forced, cfg = phantom_spec(seed)
    phantom = make_phantom(seed, forced, cfg)
    grid = (volume_grid(phantom.volume.hu) * HU_SCALE).round().to(torch.int16).numpy()[0]
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
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(render_case, todo, [cache] * len(todo), chunksize=4):
                bar.update()
    bar.close()


def load_case(seed: int, cache: Path) -> tuple[np.ndarray, dict]:
    with np.load(cache / f"{seed}.npz") as data:
        return data["grid"], json.loads(str(data["truth"]))


# ------------------------------------------------------------------------------------------------- simulated measure

def simulate_measurements(truth: list[dict], rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    """Ground truth -> (measured findings for the prompt, findings for the target text).

    The target reports every measured finding with the measured numbers, and large-scale findings that the
    measurement missed without numbers ("unmeasured"): what the encoder must add."""
    measured, target = [], []

    def noisy(value, rel, absolute=0.0):
        return max(0.5, float(value) * (1 + rel * rng.standard_normal()) + absolute * rng.standard_normal())

    for f in truth:
        kind = f["type"]
        if kind in ("nodule", "calcified_granuloma"):
            keep = KEEP_SMALL_NODULE if f["diameter_mm"] < SMALL_NODULE_MM else KEEP_NODULE
            if rng.random() >= keep:
                continue  # a missed nodule: not in the prompt, not in the target (the encoder cannot see it)
            long_ax = noisy(f["long_axis_mm"], SIZE_NOISE_REL, SIZE_NOISE_MM)
            short_ax = min(long_ax, noisy(f["short_axis_mm"], SIZE_NOISE_REL, SIZE_NOISE_MM))
            m = {**f, "long_axis_mm": long_ax, "short_axis_mm": short_ax, "diameter_mm": (long_ax + short_ax) / 2}
            measured.append(m)
            target.append(m)
        elif kind in ("pleural_effusion", "pericardial_effusion", "emphysema"):
            if rng.random() >= (KEEP_EMPHYSEMA if kind == "emphysema" else KEEP_EFFUSION):
                target.append({**f, "unmeasured": True})
                continue
            m = dict(f)
            if kind == "emphysema":
                m["laa950_percent"] = max(0.0, f["laa950_percent"] + LAA_NOISE_PP * rng.standard_normal())
            else:
                m["volume_ml"] = noisy(f["volume_ml"], VOLUME_NOISE_REL)
            measured.append(m)
            target.append(m)
        else:  # consolidation, cardiomegaly
            if rng.random() >= MEASURED_LARGE:
                target.append({**f, "unmeasured": True})
                continue
            m = dict(f)
            if kind == "consolidation":
                m["volume_ml"] = noisy(f["volume_ml"], VOLUME_NOISE_REL)
            else:
                m["cardiothoracic_ratio"] = float(f["cardiothoracic_ratio"]) + CTR_NOISE * rng.standard_normal()
            measured.append(m)
            target.append(m)
    if rng.random() < FALSE_NODULE_RATE:  # a false-positive candidate the model must still report (it was measured)
        d = float(rng.uniform(3.0, 7.0))
        lobe = str(rng.choice(["RUL", "RML", "RLL", "LUL", "LLL"]))
        fp = {"type": "nodule", "composition": "solid", "lobe": lobe, "side": "right" if lobe[0] == "R" else "left",
              "diameter_mm": d, "long_axis_mm": d * 1.1, "short_axis_mm": d * 0.9}
        measured.append(fp)
        target.append(fp)
    measured.sort(key=prompt_order)
    for i, m in enumerate(measured):
        m["id"] = f"M{i + 1}"
    return measured, target


def split_sections(sections: dict) -> tuple[str, str, str, str]:
    """Reference-report sections -> (lungs, pleura, heart, impression) texts."""
    text = sections["findings"]
    lungs, _, rest = text.partition(" Pleura: ")
    pleura, _, heart = rest.partition(" Heart and mediastinum: ")
    return lungs.removeprefix("Lungs: ").strip(), pleura.strip(), heart.strip(), sections["impression"].strip()


def write_target(findings: list[dict], rng: np.random.Generator, withheld: bool) -> str:
    """The narrative the model should write for these findings (numbers as given; none when withheld)."""
    from pipelines.ct.reference_report import reference_report

    if withheld:
        findings = [{**f, "unmeasured": True} for f in findings if f["type"] in LARGE_SCALE]
    sections = reference_report(findings, None, SimpleNamespace(thickness_mm=1.0), rng)
    return target_text(*split_sections(sections))


def sample_text(truth: dict, rng: np.random.Generator, withheld_rate: float,
                indications: list[str]) -> tuple[str, str, str | None]:
    """(prompt, target, indication) for one training view of a case (a phantom or a CT-RATE study)."""
    if "target" in truth:  # real data: the measurement module's findings and the radiologist's text
        indication = truth.get("indication") or None
        return prompt_text(truth["rows"], indication), truth["target"], indication
    withheld = rng.random() < withheld_rate
    measured, target = simulate_measurements(truth["findings"], rng)
    indication = str(rng.choice(indications)) if indications and rng.random() < 0.5 else None
    prompt = prompt_text(None if withheld else measured, indication)
    return prompt, write_target(truth["findings"] if withheld else target, rng, withheld), indication


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
            grid = (volume_grid(volume.hu) * HU_SCALE).round().to(torch.int16).numpy()[0]
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
    """The report model during training: the core plus a finding head on the mean of the bridge's prefix.

    The head (7 presence logits, one per finding type) is trained with the narrative (loss weight
    `aux_weight`): it gives the volume encoder and the bridge a direct signal that the prefix must carry what the
    volume shows. Without it the core learns to copy the prompt and leaves the volume tokens unused (encoder-only F1
    0.0 after 1,800 steps). The head is not part of the saved checkpoint."""

    def __init__(self, core):
        super().__init__()
        self.core = core
        self.finding_head = torch.nn.Linear(core.cfg.lm.dim, len(FINDING_TYPES))

    def update_router_bias(self) -> None:
        self.core.update_router_bias()

    def forward(self, batch: dict, aux_weight: float):
        prefix, ids, mask = self.core._prefix_and_mask(batch["inputs"], batch["input_ids"], batch["attention_mask"])
        loss = self.core.lm(ids, prefix_embeds=prefix, attention_mask=mask, labels=batch["labels"].to(ids.device)).loss
        if aux_weight and "presence" in batch:
            weight = batch["presence_mask"].to(prefix.device).float()[:, None].expand(-1, len(FINDING_TYPES))
            logits = self.finding_head(prefix.mean(1))
            aux = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, batch["presence"].to(prefix.device), weight=weight, reduction="sum") / weight.sum().clamp(min=1)
            loss = loss + aux_weight * aux
        return loss


def presence(findings: list[dict]) -> list[float]:
    """Presence of each finding type (FINDING_TYPES order) in ground-truth findings."""
    kinds = {f["type"] for f in findings}
    return [float(t in kinds) for t in FINDING_TYPES]


# ----------------------------------------------------------------------------------------------------------- recipe

@register_recipe("ct-report")
class CTReportRecipe(Recipe):
    description = ("synthetic chest CT phantoms (pipelines.ct.phantom; 128 x 128 x 64 slices at 3.75/5 mm, reduced to "
                   f"a {GRID[0]}x{GRID[1]}x{GRID[2]} grid) with simulated measurements in the prompt and "
                   "reference-grammar Findings/Impression as targets")

    def __init__(self, data: str | None = None, phantoms: str | int = 1200, cache: str | None = None,
                 workers: str | int = 2, withheld: str | float = 0.2, audio: str | int = 1,
                 eval_phantoms: str | int = 24, init: str | None = None, aux_weight: str | float = 1.0,
                 reinit: str = "", **options):
        super().__init__(data, **options)
        self.init = Path(init) if init else None
        self.reinit = tuple(part for part in reinit.split(",") if part)
        if set(self.reinit) - {"bridge"}:
            raise InputError(f"--option reinit: expected 'bridge' or nothing, found {reinit!r}")
        self.aux_weight = float(aux_weight)
        self.n_phantoms, self.workers, self.eval_phantoms = int(phantoms), int(workers), int(eval_phantoms)
        self.withheld_rate = float(withheld)
        if not 0 <= self.withheld_rate <= 1:
            raise InputError(f"--option withheld: expected a share in 0..1, found {withheld}")
        if self.n_phantoms < 8:
            raise InputError(f"--option phantoms: expected at least 8, found {phantoms}")
        self.cache = Path(cache) if cache else default_cache()
        self.use_audio = bool(int(audio))
        self._cases: list[tuple[np.ndarray, dict]] | None = None
        self._dictations: dict[str, list[np.ndarray]] | None = None

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=1800, batch_size=8, lr=2e-3, warmup_steps=100, weight_decay=0.05,
                           min_lr_ratio=0.05, log_every=20, seed=7)

    def data_card(self) -> dict:
        if self.data:
            return {"training_data": f"CT-RATE layout at {self.data} (train split)", "synthetic": False}
        pool = self.dictations()
        return {"training_data": self.description, "synthetic": True, "phantoms": self.n_phantoms,
                "phantom_seeds": [TRAIN_SEED_BASE, TRAIN_SEED_BASE + self.n_phantoms - 1],
                "withheld_share": self.withheld_rate,
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
                prompt, target, _ = sample_text(truth, rng, 0.2, list(INDICATIONS))
                texts += [prompt, target]
        return Tokenizer.train(texts, vocab_size=1024)

    def build_model(self, tokenizer):
        from mmcore.model import MultimodalModel
        from pipelines.ct.report_model import ReportModel, report_model_config

        if self.init is not None:
            core = ReportModel.load(self.init, device="cpu").model.train()
            if core.cfg.lm.vocab_size != tokenizer.vocab_size:
                raise InputError(f"--option init={self.init}: its vocabulary ({core.cfg.lm.vocab_size}) differs from "
                                 f"the tokenizer's ({tokenizer.vocab_size})")
            if "bridge" in self.reinit:  # a bridge whose attention collapsed onto its null token passes no gradient
                from mmcore.bridge import CrossModalBridge

                core.bridge = CrossModalBridge(core.cfg.bridge, {n: e.out_dim for n, e in core.encoders.items()},
                                               core.cfg.lm.dim)
        else:
            core = MultimodalModel(report_model_config(tokenizer.vocab_size))
        core.tokenizer = tokenizer
        return ReportTrainingModel(core)

    def loss(self, model, batch: dict) -> torch.Tensor:
        return model(batch, self.aux_weight)

    def batch(self, step, micro, rank, world_size, batch_size, tokenizer) -> dict:
        from pipelines.ct.reference_report import INDICATIONS
        from pipelines.ct.report_model import model_inputs

        cases, pool = self.cases(), self.dictations()
        rng = np.random.default_rng([7, step, micro, rank])
        grids, audio, prompts, targets, present, known = [], [], [], [], [], []
        for i in rng.integers(len(cases), size=batch_size):
            grid, truth = cases[int(i)]
            known.append("findings" in truth)  # phantom ground truth; CT-RATE text has no per-type truth here
            present.append(presence(truth["findings"]) if "findings" in truth else [0.0] * len(FINDING_TYPES))
            prompt, target, indication = sample_text(truth, rng, self.withheld_rate, list(INDICATIONS))
            x = torch.from_numpy(grid.astype(np.float32) / HU_SCALE)
            # Augmentation: +-1 voxel shift, small level offset and extra noise (scanner and reconstruction spread).
            x = torch.roll(x, tuple(int(v) for v in rng.integers(-1, 2, size=3)), dims=(0, 1, 2))
            x = x + float(rng.normal(0, 0.01)) + 0.01 * torch.from_numpy(rng.standard_normal(x.shape,
                                                                                              dtype=np.float32))
            grids.append(x[None])
            notes = pool.get(indication) if indication else None
            audio.append(torch.from_numpy(notes[int(rng.integers(len(notes)))].astype(np.float32))
                         if notes and rng.random() < 0.5 else None)
            prompts.append(prompt)
            targets.append(target)
        return {"inputs": model_inputs(grids, audio if pool else None), **text_batch(tokenizer, prompts, targets),
                "presence": torch.tensor(present), "presence_mask": torch.tensor(known)}

    # ---- evaluation and saving
    def evaluate(self, model, tokenizer) -> dict:
        """Finding macro-F1, encoder-only F1 and BLEU on `eval_phantoms` validation phantoms (simulated
        measurements); the full evaluation is `mmcore eval ct-report`."""
        from pipelines.ct.report_eval import evaluate_cases
        from pipelines.ct.report_model import ReportModel

        if self.eval_phantoms <= 0:
            return {}
        seeds = list(range(VALID_SEED_BASE, VALID_SEED_BASE + self.eval_phantoms))
        ensure_cache(seeds, self.cache, self.workers, progress=False)
        model.eval()
        writer = ReportModel(model.core)
        metrics = evaluate_cases(writer, [load_case(s, self.cache) for s in seeds], seed=VALID_SEED_BASE)
        model.train()
        return {k: metrics[k] for k in ("finding_macro_f1", "encoder_only_f1", "bleu4", "rougeL")}

    def save(self, model, out_dir: Path, card: dict) -> None:
        extra = {"task": "ct-report", "grid": list(GRID), "hu_clip": [-1000, 1000], "hu_scale": HU_SCALE,
                 "prompt": "measured: ... | indication: ... | report:", "audio_features": "whisper-base encoder (512)"}
        card = {**card, "init": str(self.init) if self.init else None, "reinit": list(self.reinit),
                "aux_weight": self.aux_weight}
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
