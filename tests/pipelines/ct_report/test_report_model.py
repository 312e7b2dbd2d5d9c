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
from pipelines.ct.train import (LARGE_SCALE, route_sentences, sample_text, simulate_measurements, text_batch,
                                write_target)

SHIPPED = (DEFAULT_CHECKPOINT / "model.safetensors").is_file()


def test_volume_grid_clips_scales_and_averages():
    hu = np.full((40, 128, 128), -1000, np.int16)
    hu[:, :64] = 3000  # anterior half far above the clip
    grid = volume_grid(hu)
    assert tuple(grid.shape) == (1, *GRID)
    assert float(grid.max()) == pytest.approx(1.0) and float(grid.min()) == pytest.approx(-1.0)
    assert float(grid[0, :, :32].mean()) == pytest.approx(1.0) and float(grid[0, :, 32:].mean()) == pytest.approx(-1.0)
    noisy = np.random.default_rng(0).normal(0, 100, (64, 256, 256)).astype(np.int16)
    # 100 HU white noise = 0.1 after scaling; 4 x 4 in-plane averaging (z unchanged) divides it by 4
    assert float(volume_grid(noisy).std()) == pytest.approx(0.025, rel=0.05)
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
                    "indication: Chronic cough.\nreport:")
    assert prompt_text([], None).startswith("measured: none\nindication: none")
    assert prompt_text(None).startswith("measured: withheld")
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
        measured, target = simulate_measurements(truth, rng)
        assert [m["id"] for m in measured] == [f"M{i + 1}" for i in range(len(measured))]
        text = write_target(target, rng, withheld=False)
        labels = finding_labels(text)
        for m in measured:
            kind = m["type"]
            assert labels[kind], (kind, text)
            if kind == "pleural_effusion":  # the target says the measured volume, not the true one
                assert f"{m['volume_ml']:.0f} mL" in text
        assert labels["cardiomegaly"] and labels["pleural_effusion"]  # measured or seen, always reported


def test_withheld_targets_hold_only_large_scale_findings_without_numbers():
    truth = [{"type": "nodule", "side": "right", "lobe": "RUL", "diameter_mm": 8.0, "long_axis_mm": 9.0,
              "short_axis_mm": 7.0, "composition": "solid"},
             {"type": "emphysema", "side": "bilateral", "lobe": None, "laa950_percent": 18.0,
              "predominance": "upper lobe"},
             {"type": "consolidation", "side": "left", "lobe": "LLL", "volume_ml": 80.0}]
    text = write_target(truth, np.random.default_rng(3), withheld=True)
    labels = finding_labels(text)
    assert labels["emphysema"] and labels["consolidation"] and not labels["nodule"]
    assert not any(ch.isdigit() for ch in text.replace("1.", "").replace("2.", "").replace("3.", ""))
    assert set(LARGE_SCALE) == {"pleural_effusion", "consolidation", "cardiomegaly", "emphysema"}
    prompt, _, _ = sample_text({"findings": truth}, np.random.default_rng(1), withheld_rate=1.0, indications=[])
    assert prompt.startswith("measured: withheld")


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
