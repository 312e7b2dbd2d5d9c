"""The report model's inputs and outputs: grid, prompt, target, parsing, the training data it learns from, the
fallbacks around it, and (with the shipped checkpoint) reports that name a phantom's findings."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pipelines.ct.grounding import finding_labels, label_text
from pipelines.ct.report import MODEL_SIZE_POLICY, build_report, draft_report, measurements_from_findings
from pipelines.ct.report_model import (DEFAULT_CHECKPOINT, GRID, Draft, ReportModel, ReportModelError,
                                       describe_measurement, measurement_dicts, parse_narrative, prompt_text,
                                       target_text, volume_grid)
from pipelines.ct.train import (LARGE_SCALE, route_sentences, sample_text, simulate_measurements, simulate_seen,
                                text_batch, unmeasured_seen, write_target)

SHIPPED = (DEFAULT_CHECKPOINT / "model.safetensors").is_file()


def test_volume_grid_clips_scales_averages_and_keeps_the_low_attenuation_share():
    hu = np.full((40, 128, 128), -1000, np.int16)
    hu[:, :64] = 3000  # anterior half far above the clip
    grid = volume_grid(hu)
    assert tuple(grid.shape) == (2, *GRID)
    assert float(grid[0].max()) == pytest.approx(1.0) and float(grid[0].min()) == pytest.approx(-1.0)
    assert float(grid[0, :, :32].mean()) == pytest.approx(1.0) and float(grid[0, :, 32:].mean()) == pytest.approx(-1.0)
    assert float(grid[1, :, :32].max()) == 0.0 and float(grid[1, :, 32:].min()) == pytest.approx(1.0)
    noisy = np.random.default_rng(0).normal(0, 100, (64, 256, 256)).astype(np.int16)
    # 100 HU white noise = 0.1 after scaling; 4 x 4 in-plane averaging (z unchanged) divides it by 4
    assert float(volume_grid(noisy)[0].std()) == pytest.approx(0.025, rel=0.05)
    # emphysema-like lung: 20 % of voxels at -980 HU among -860 HU moves the mean by 24 HU but the share by 0.2
    lung = np.full((64, 128, 128), -860, np.int16)
    lung.reshape(-1)[np.random.default_rng(1).random(lung.size) < 0.2] = -980
    g = volume_grid(lung)
    assert float(g[0].mean()) * 1000 == pytest.approx(-884, abs=2) and float(g[1].mean()) == pytest.approx(0.2, abs=0.01)
    with pytest.raises(ReportModelError, match="3-D HU array"):
        volume_grid(np.zeros((4, 4)))


def test_prompt_lists_measurements_in_a_fixed_order_with_their_numbers():
    rows = [{"id": "M2", "type": "pleural_effusion", "side": "left", "volume_ml": 412.4},
            {"id": "M1", "type": "nodule", "composition": "part-solid", "lobe": "RUL", "side": "right",
             "diameter_mm": 9.6, "long_axis_mm": 11.2, "short_axis_mm": 8.1},
            {"id": "M3", "type": "nodule", "composition": "calcified", "lobe": "LLL", "diameter_mm": 4.2},
            {"id": "M4", "type": "emphysema", "laa950_percent": 13.6},
            {"id": "M5", "type": "cardiomegaly", "cardiothoracic_ratio": 0.5812}]
    text = prompt_text(rows, "Chronic   cough.")
    assert text == ("measured: M1 nodule part-solid RUL 11x8 mm mean 10 mm | M3 calcified granuloma LLL 4 mm | "
                    "M2 pleural effusion left 412 mL | M4 emphysema LAA 14% | M5 cardiomegaly CTR 0.58\n"
                    "seen: not assessed\nindication: Chronic cough.\nreport:")
    assert prompt_text([], None, []).startswith("measured: none\nseen: none\nindication: none")
    seen = [{"type": "pleural_effusion", "side": "left"}, {"type": "cardiomegaly", "side": None}]
    assert prompt_text(None, None, seen).startswith("measured: withheld\nseen: pleural effusion left | cardiomegaly\n")
    assert describe_measurement({"type": "pericardial_effusion", "volume_ml": 250.0}) == "pericardial effusion 250 mL"


def test_narrative_round_trip_and_missing_sections():
    text = target_text("Nodule in the right upper lobe.", "No pleural effusion.", "Heart size is normal.",
                       "1. Nodule.")
    findings, impression, missing = parse_narrative(text)
    assert findings.lungs_airways == "Nodule in the right upper lobe." and findings.pleura == "No pleural effusion."
    assert findings.heart_pericardium == "Heart size is normal." and impression == "1. Nodule." and missing == []
    findings, impression, missing = parse_narrative("lungs: Clear. | heart: Normal.")
    assert missing == ["pleura", "impression"] and findings.lungs_airways == "Clear." and impression == ""


def test_simulated_measurements_keep_numbers_consistent_between_prompt_and_target():
    truth = [{"type": "nodule", "side": "right", "lobe": "RLL", "diameter_mm": 12.0, "long_axis_mm": 13.0,
              "short_axis_mm": 11.0, "composition": "solid", "volume_ml": 0.9},
             {"type": "pleural_effusion", "side": "left", "lobe": None, "volume_ml": 640.0},
             {"type": "cardiomegaly", "side": None, "lobe": None, "cardiothoracic_ratio": 0.61}]
    for seed in range(30):
        rng = np.random.default_rng(seed)
        measured = simulate_measurements(truth, rng)
        assert [m["id"] for m in measured] == [f"M{i + 1}" for i in range(len(measured))]
        seen = [{"type": "pleural_effusion", "side": "left"}, {"type": "cardiomegaly", "side": None}]
        text = write_target(measured + unmeasured_seen(seen, measured), rng)
        labels = finding_labels(text)
        for m in measured:
            kind = m["type"]
            assert labels[kind], (kind, text)
            if kind == "pleural_effusion":  # the target says the measured volume, not the true one
                assert f"{m['volume_ml']:.0f} mL" in text
        assert labels["cardiomegaly"] and labels["pleural_effusion"]  # measured or seen, always reported
        if not any(m["type"] == "pleural_effusion" for m in measured):  # seen only: in words, no volume
            assert "mL" not in text.split("| pleura:")[1].split("|")[0]


def test_seen_findings_follow_the_truth_with_rare_misses_and_false_labels():
    truth = [{"type": "pleural_effusion", "side": "right", "volume_ml": 300.0},
             {"type": "consolidation", "side": "left", "lobe": "LLL", "volume_ml": 80.0},
             {"type": "nodule", "side": "right", "lobe": "RUL", "diameter_mm": 8.0}]
    rng = np.random.default_rng(0)
    draws = [simulate_seen(truth, rng) for _ in range(400)]
    exact = sum(d == [{"type": "pleural_effusion", "side": "right"}, {"type": "consolidation", "side": "left"}]
                for d in draws)
    assert 0.75 < exact / len(draws) < 0.95  # misses at 8% per label, a false label at 5%
    assert all(f["type"] != "nodule" for d in draws for f in d)  # nodules are never "seen" on the coarse grid
    # a seen finding that was measured is reported once, with its numbers; one nobody measured, in words
    measured = [{"type": "pleural_effusion", "side": "right", "volume_ml": 310.0, "id": "M1"}]
    left = unmeasured_seen([{"type": "pleural_effusion", "side": "right"}, {"type": "consolidation", "side": "left"}],
                           measured)
    assert left == [{"type": "consolidation", "side": "left", "lobe": None, "unmeasured": True}]
    text = write_target(measured + left, rng)
    assert "310 mL" in text and "left lung" in text


def test_withheld_targets_hold_only_seen_findings_without_numbers():
    truth = [{"type": "nodule", "side": "right", "lobe": "RUL", "diameter_mm": 8.0, "long_axis_mm": 9.0,
              "short_axis_mm": 7.0, "composition": "solid"},
             {"type": "emphysema", "side": "bilateral", "lobe": None, "laa950_percent": 18.0,
              "predominance": "upper lobe"},
             {"type": "consolidation", "side": "left", "lobe": "LLL", "volume_ml": 80.0}]
    for seed in range(20):
        prompt, target, _, with_volume = sample_text({"findings": truth}, np.random.default_rng(seed),
                                                     withheld_rate=1.0, indications=[])
        assert prompt.startswith("measured: withheld")
        labels = finding_labels(target)
        assert not labels["nodule"]
        assert not any(ch.isdigit() for ch in target.replace("1.", "").replace("2.", "").replace("3.", ""))
        seen_line = prompt.split("\n")[1]
        # the target reports exactly what the prompt says was seen
        assert labels["emphysema"] == ("emphysema" in seen_line) and labels["consolidation"] == ("consolidation" in seen_line)
        assert with_volume or seen_line == "seen: not assessed"
    assert set(LARGE_SCALE) == {"pleural_effusion", "consolidation", "cardiomegaly", "emphysema"}


def test_finding_head_labels_thresholds_and_round_trip():
    import torch

    from pipelines.ct.finding_head import (SEEN_LABELS, VolumeFindingHead, best_thresholds, head_tensors,
                                           labels_of, load_head, seen_findings)

    truth = [{"type": "pleural_effusion", "side": "left"}, {"type": "cardiomegaly", "side": None},
             {"type": "nodule", "side": "right"}]
    assert labels_of(truth) == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert seen_findings([0.1, 0.9, 0.2, 0.0, 0.0, 0.0, 0.6], [0.5] * 7) == [
        {"type": "pleural_effusion", "side": "left"}, {"type": "cardiomegaly", "side": None}]
    # label 0 separates at 0.4..0.6 (cut at the middle of the best plateau); label 1 never occurs: default cut
    p = np.array([[0.9, 0.1], [0.7, 0.2], [0.3, 0.1], [0.2, 0.3]])
    y = np.array([[1, 0], [1, 0], [0, 0], [0, 0]])
    cuts, f1 = best_thresholds(p, y)
    assert 0.3 < cuts[0] <= 0.7 and cuts[1] == 0.5 and f1 == [1.0, None]
    # a label the head cannot tell apart on validation (best F1 2/3 < MIN_SEEN_F1) is switched off, and a label
    # switched off is never seen
    weak = np.array([[0.6, 0.1], [0.6, 0.2], [0.6, 0.1], [0.6, 0.3]])
    cuts, f1 = best_thresholds(weak, y)
    assert cuts[0] is None and f1[0] == pytest.approx(2 / 3, abs=1e-4)
    assert seen_findings([0.99, 0.9, 0.0, 0.0, 0.0, 0.0, 0.6], [None] + [0.5] * 6) == [
        {"type": "pleural_effusion", "side": "left"}, {"type": "cardiomegaly", "side": None}]
    head = VolumeFindingHead(16, n_tokens=10)
    tokens, mask = torch.randn(2, 10, 16), torch.ones(2, 10, dtype=torch.bool)
    mask[1, 5:] = False
    logits = head(tokens, mask)
    assert logits.shape == (2, len(SEEN_LABELS))
    # masked tokens do not count: changing them leaves the logits unchanged; a real token does change them
    changed = tokens.clone()
    changed[1, 5:] = 100.0
    assert torch.allclose(head(changed, mask)[1], logits[1])
    changed[1, 0] = 100.0
    assert not torch.allclose(head(changed, mask)[1], logits[1])
    loaded = load_head(head_tensors(head), 16)
    assert torch.allclose(loaded(tokens, mask), logits)
    with pytest.raises(ValueError, match="expected 10 volume tokens"):
        head(torch.randn(1, 12, 16), torch.ones(1, 12, dtype=torch.bool))
    assert load_head({}, 16) is None


def test_real_studies_take_their_seen_findings_from_the_report_text():
    from pipelines.ct.train import case_findings

    target = ("lungs: Consolidation in the right lower lobe. No nodules. | pleura: Small bilateral pleural effusions. "
              "| heart: Cardiomegaly. No pericardial effusion. | impression: Emphysema.")
    found = {(f["type"], f["side"]) for f in case_findings({"target": target, "rows": []})}
    assert found == {("consolidation", "right"), ("pleural_effusion", "right"), ("pleural_effusion", "left"),
                     ("cardiomegaly", None), ("emphysema", None)}
    prompt, out, _, with_volume = sample_text({"target": target, "rows": [], "indication": "Cough."},
                                              np.random.default_rng(0), 0.0, [])
    assert out == target and with_volume
    assert prompt.split("\n")[1].startswith("seen: ") and "consolidation right" in prompt


def test_text_batch_trains_on_the_target_only():
    from mmcore.tokenizer import Tokenizer

    tok = Tokenizer.train(["measured: none report:", "lungs: Clear. | impression: Normal."], vocab_size=300)
    batch = text_batch(tok, ["measured: none report:", "measured: none"], ["lungs: Clear.", "lungs: Clear. More."])
    for row, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        sep = int((row == tok.sep_id).nonzero()[0])
        assert (labels[:sep + 1] == -100).all()  # <bos> prompt <sep> carry no loss
        target = labels[sep + 1:][labels[sep + 1:] != -100]
        assert tok.decode(target[:-1]).startswith("lungs: Clear.") and int(target[-1]) == tok.eos_id
        assert int(mask.sum()) == sep + 1 + len(target)


def test_free_text_findings_are_routed_into_systems():
    lungs, pleura, heart = route_sentences("Trachea is open. A 5 mm nodule in the right upper lobe. "
                                           "Small left pleural effusion. Heart size is normal.")
    assert lungs == "A 5 mm nodule in the right upper lobe."
    assert pleura == "Small left pleural effusion." and heart == "Trachea is open. Heart size is normal."


class _FailingWriter:
    model_id = "ct-report@broken"

    def info(self):
        from pipelines.ct.report import ModelInfo

        return ModelInfo(id=self.model_id)

    def write_one(self, *args, **kwargs):
        raise RuntimeError("weights corrupted")


class _PartialWriter(_FailingWriter):
    model_id = "ct-report@partial"

    def write_one(self, grid, rows, indication=None, audio=None):
        findings, impression, missing = parse_narrative("lungs: A nodule is present. | heart: Heart size is normal.")
        return Draft(findings, impression, "", missing, 0.01)


def test_a_failing_model_falls_back_to_the_template_with_a_flag(study):
    report, _ = draft_report(study.folder, writer=_FailingWriter())
    assert report.model.id == "template"
    assert any(f.kind == "model" and "weights corrupted" in f.message for f in report.flags)
    assert "pleural effusion" in report.findings.pleura.lower()  # the template still reports the findings


def test_sections_the_model_leaves_out_come_from_the_template_and_are_flagged(study):
    report, _ = draft_report(study.folder, writer=_PartialWriter())
    assert report.model.id == "ct-report@partial"
    assert report.findings.lungs_airways == "A nodule is present."
    assert "pleural effusion" in report.findings.pleura.lower() and report.impression
    assert any(f.kind == "model" and "pleura, impression" in f.message for f in report.flags)


def test_a_checkpoint_that_is_not_a_report_model_is_refused(tmp_path):
    from mmcore.config import preset
    from mmcore.model import MultimodalModel

    cfg = preset("tiny")
    cfg.image = None
    MultimodalModel(cfg, load_pretrained=False).save(tmp_path / "ckpt")
    with pytest.raises(ReportModelError, match="not a ct-report checkpoint"):
        ReportModel.load(tmp_path / "ckpt")
    with pytest.raises(ReportModelError, match="cannot load"):
        ReportModel.load(tmp_path / "missing")


# ---- with the shipped demo checkpoint ---------------------------------------------------------------------------

needs_checkpoint = pytest.mark.skipif(not SHIPPED, reason=f"no report checkpoint at {DEFAULT_CHECKPOINT}")


@pytest.fixture(scope="module")
def writer():
    return ReportModel.load(DEFAULT_CHECKPOINT) if SHIPPED else None


@needs_checkpoint
def test_shipped_checkpoint_is_small_fp16_and_says_it_is_synthetic(writer):
    card = json.loads((DEFAULT_CHECKPOINT / "card.json").read_text())
    config = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())
    assert (DEFAULT_CHECKPOINT / "model.safetensors").stat().st_size <= 25 * 1024 * 1024
    assert config["storage_dtype"] == "float16" and config["extra"]["task"] == "ct-report"
    assert card["synthetic"] is True and "not for diagnostic use" in card["notice"].lower()
    assert card["steps"] > 0 and "metrics" in card
    assert writer.info().demo is True and writer.model_id.startswith("ct-report@")


@needs_checkpoint
def test_model_report_names_the_phantom_findings(study, writer):
    report, _ = draft_report(study.folder, writer=writer)
    assert report.model.id == writer.model_id and report.model.checkpoint_sha256 == writer.sha256
    assert not [f for f in report.flags if f.kind == "model"]
    labels = finding_labels(report.narrative())
    for kind in ("nodule", "pleural_effusion", "emphysema"):
        assert labels[kind], (kind, report.narrative())
    assert report.findings.mediastinum_lymph_nodes  # systems the model does not write are still filled


@needs_checkpoint
def test_model_numbers_end_as_the_measured_values_and_every_change_is_flagged(study, writer):
    rows = measurement_dicts(measurements_from_findings(study.findings, study.volume.spacing_zyx))
    draft = writer.write_one(volume_grid(study.volume.hu), rows)
    report = build_report(study.findings, metadata=study.volume.metadata, narrative=(draft.findings, draft.impression),
                          spacing_zyx=study.volume.spacing_zyx, model=writer.info(), size_policy=MODEL_SIZE_POLICY)
    effusion = next(m for m in report.measurements if m.kind == "pleural_effusion")
    assert f"{effusion.volume_ml:.0f} mL" in report.narrative()
    assert not [f for f in report.flags if f.kind == "size_mismatch"]
    said = {v for m in label_text(draft.findings.pleura + " " + draft.impression) if m.type == "pleural_effusion"
            for v, _, _ in m.volumes_ml}  # what the model itself wrote, before grounding
    corrected = [f for f in report.flags if f.kind == "size_corrected" and f.measurement_id == effusion.id]
    if any(abs(v - effusion.volume_ml) > max(5.0, 0.2 * effusion.volume_ml) for v in said):
        assert corrected  # the model's own number was replaced, and the report says so


@needs_checkpoint
@pytest.mark.slow
def test_cli_report_json_has_the_contract_keys(study, tmp_path):
    out = subprocess.run([sys.executable, "-m", "apps.cli", "ct", "report", str(study.folder), "--json",
                          "--pdf", str(tmp_path / "r.pdf"), "--fhir", str(tmp_path / "r.fhir.json"),
                          "--sr", str(tmp_path / "r.dcm"), "--deidentify", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for key in ("findings", "impression", "measurements", "flags", "status", "model"):
        assert key in report
    assert report["status"] == "draft" and report["model"]["id"].startswith("ct-report@")
    assert all(set(f) >= {"kind", "message"} for f in report["flags"])
    assert report["deidentified"] is True and report["patient"]["name"] != study.volume.metadata.patient_name
    assert (tmp_path / "r.pdf").read_bytes()[:5] == b"%PDF-" and (tmp_path / "r.dcm").stat().st_size > 1000


@needs_checkpoint
@pytest.mark.slow
def test_eval_ct_report_prints_the_contract_keys():
    out = subprocess.run([sys.executable, "-m", "apps.cli", "eval", "ct-report", str(DEFAULT_CHECKPOINT), "--n", "2",
                          "--size", "128", "--slices", "48", "--thickness", "5", "--json", "--device", "cpu"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout)
    for key in ("finding_macro_f1", "encoder_only_f1", "baseline_f1", "location_accuracy",
                "unflagged_size_mismatches", "bleu4", "rougeL"):
        assert key in metrics
    assert metrics["n_phantoms"] == 2 and 0 <= metrics["finding_macro_f1"] <= 1
    assert metrics["unflagged_size_mismatches"] == 0


def test_cli_report_names_a_missing_voice_note(study, tmp_path):
    out = subprocess.run([sys.executable, "-m", "apps.cli", "ct", "report", str(study.folder), "--template",
                          "--voice", str(tmp_path / "none.wav")], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "none.wav: no such file" in out.stderr and "Traceback" not in out.stderr


def test_template_cli_report_prints_a_readable_draft(study):
    out = subprocess.run([sys.executable, "-m", "apps.cli", "ct", "report", str(study.folder), "--template"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "CT report (draft, template)" in out.stdout and "Impression:" in out.stdout


@pytest.mark.slow
def test_recipe_trains_the_finding_head_then_the_writer_and_saves_both(tmp_path):
    from pipelines.ct.finding_head import SEEN_LABELS

    cache = tmp_path / "cache"
    out = subprocess.run([sys.executable, "-m", "apps.cli", "train", "ct-report", "--steps", "4", "--warmup-steps", "1",
                          "--option", "phantoms=8", "--option", f"cache={cache}", "--option", "audio=0",
                          "--option", "findings_steps=2", "--option", "eval_phantoms=2",
                          "--option", "threshold_phantoms=3", "--option", "workers=1",
                          "--out", str(tmp_path / "run"), "--no-progress", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    writer = ReportModel.load(tmp_path / "run")
    assert writer.finding_head is not None and len(writer.thresholds) == len(SEEN_LABELS)
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    assert card["findings_steps"] == 2 and card["metrics"]["finding_head_validation_phantoms"] == 3
    grid = volume_grid(np.full((16, 64, 64), -860, np.int16))
    seen = writer.see([grid, None])
    assert isinstance(seen[0], list) and seen[1] is None
    assert all((f["type"], f["side"]) in SEEN_LABELS for f in seen[0])
    draft = writer.write_one(grid, [], None)
    assert draft.seen == seen[0] and isinstance(draft.text, str)
    # the writer phase froze what the findings phase taught: continuing with findings_steps=0 needs a head
    bad = subprocess.run([sys.executable, "-m", "apps.cli", "train", "ct-report", "--steps", "1",
                          "--option", "phantoms=8", "--option", f"cache={cache}", "--option", "findings_steps=0",
                          "--out", str(tmp_path / "run2"), "--no-progress"], capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode != 0 and "findings_steps=0" in bad.stderr
