import json

import numpy as np
import pytest
import torch

from pipelines.wafer.dataset import batch_input
from pipelines.wafer.maps import CLASSES, PATTERNS, WaferError
from pipelines.wafer.scoring import (AnomalyModel, ProductThresholds, Thresholds, WaferScorer,
                                     expected_calibration_error, fit_temperature, read_wafer_meta)
from pipelines.wafer.synth import generate


def test_thresholds_per_product_round_trip(tmp_path):
    t = Thresholds.from_dict({"P1": {"defect": 0.3}, "default": {"defect": 0.6, "anomaly": 0.95}})
    assert t.for_product("P1") == ProductThresholds(defect=0.3, anomaly=0.99)
    assert t.for_product("other") == t.for_product(None) == ProductThresholds(0.6, 0.95)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(t.to_dict()))
    assert Thresholds.load(path).to_dict() == t.to_dict()
    path.write_text('{"P2": {"defect": 1.5}}')
    with pytest.raises(WaferError, match=r"P2.defect: expected a probability 0..1, found 1.5"):
        Thresholds.load(path)
    path.write_text('{"P2": {"defekt": 0.5}}')
    with pytest.raises(WaferError, match="expected an object with 'defect' and/or 'anomaly'"):
        Thresholds.load(path)
    with pytest.raises(WaferError, match="not valid JSON"):
        path.write_text("{")
        Thresholds.load(path)


def test_anomaly_model_ranks_far_points_high():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0]])
    emb = torch.cat([c + torch.randn(400, 3, generator=g) for c in centers])
    pops = ["none"] * 400 + ["Center"] * 400
    model = AnomalyModel.fit(emb, pops)
    held = torch.cat([c + torch.randn(500, 3, generator=g) for c in centers])
    model.calibrate(held)
    known = model.score(torch.cat([c + torch.randn(500, 3, generator=g) for c in centers])).numpy()
    far = model.score(torch.tensor([[3.0, 8.0, 0.0], [0.0, 0.0, 12.0]])).numpy()
    assert 0.005 < (known >= 0.99).mean() < 0.03  # calibrated: ~1% of known points over 0.99
    assert (far > 0.999).all() and (far <= 1.0).all()
    reloaded = AnomalyModel.from_tensors({k: v.half() for k, v in model.tensors().items()})
    np.testing.assert_allclose(reloaded.score(held[:50]).numpy(), model.score(held[:50]).numpy(), atol=0.02)


def test_temperature_and_ece():
    g = torch.Generator().manual_seed(1)
    truth = torch.randint(0, 2, (4000, 1), generator=g).float()
    # Class means +-6, noise sd 6: the true log-odds are logit / 3, so raw sigmoids are overconfident 3x.
    logits = (truth * 2 - 1) * 6.0 + 6.0 * torch.randn(4000, 1, generator=g)
    t = fit_temperature(logits, truth)
    assert 2.6 < float(t) < 3.5
    p = torch.sigmoid(logits / t).squeeze(1).numpy()
    conf = np.maximum(p, 1 - p)
    correct = (p >= 0.5) == truth.squeeze(1).numpy().astype(bool)
    raw = torch.sigmoid(logits).squeeze(1).numpy()
    ece_raw = expected_calibration_error(np.maximum(raw, 1 - raw), correct)
    assert expected_calibration_error(conf, correct) < 0.03 < 0.08 < ece_raw
    assert expected_calibration_error(np.array([0.9, 0.9]), np.array([1, 0])) == pytest.approx(0.4)


def test_scorer_loads_the_checkpoint_and_scores(wafer_checkpoint):
    meta = read_wafer_meta(wafer_checkpoint)
    assert meta["classes"] == list(PATTERNS) and meta["input_size"] == 32
    config = json.loads((wafer_checkpoint / "config.json").read_text())["model"]
    assert config["image"]["model_name"] == "resnet10t" and config["bridge"]["n_queries"] == 8
    assert config["lm"]["moe"]["n_routed_experts"] == 8
    card = json.loads((wafer_checkpoint / "card.json").read_text())
    assert card["recipe"] == "wafer" and card["synthetic"] is True and "not for production" in card["notice"]
    scorer = WaferScorer(wafer_checkpoint)
    grids = [w.grid for w in generate(6, seed=3)]
    s = scorer.score_grids(grids)
    assert s.pattern_probs.shape == (6, 8) and s.defect.shape == s.anomaly.shape == (6,)
    assert ((0 <= s.anomaly) & (s.anomaly <= 1)).all() and ((0 <= s.defect) & (s.defect <= 1)).all()
    probs = s.class_probs(0)
    assert list(probs) == list(CLASSES) and probs["none"] == pytest.approx(1 - s.defect[0])
    # The batch path (Ray's __call__) gives the same numbers as the direct path.
    out = scorer({"data": batch_input(grids), "id": np.arange(6)})
    np.testing.assert_allclose(out["defect_score"], s.defect, rtol=1e-5)
    assert out["id"].tolist() == list(range(6))


def test_embedding_equals_core_pooled(wafer_checkpoint):
    scorer = WaferScorer(wafer_checkpoint)
    x = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        np.testing.assert_allclose(scorer.net.embed(x).numpy(), scorer.net.core.pooled({"image": x}).numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_scorer_rejects_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(WaferError, match="not a wafer checkpoint folder"):
        WaferScorer(tmp_path)
    (tmp_path / "config.json").write_text('{"extra": {}}')
    with pytest.raises(WaferError, match="no 'wafer' section"):
        read_wafer_meta(tmp_path)
