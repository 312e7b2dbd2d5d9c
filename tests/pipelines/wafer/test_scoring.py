import json

import numpy as np
import pytest
import torch

from pipelines.wafer.dataset import batch_input
from pipelines.wafer.maps import CLASSES, PATTERNS, WaferError
from pipelines.wafer.scoring import (N_LAG_ORBITS, AnomalyModel, ProductThresholds, Scores, Thresholds, WaferScorer,
                                     expected_calibration_error, fail_autocorrelation, fit_pattern_thresholds,
                                     fit_temperature, read_wafer_meta)
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


def test_anomaly_views_flag_a_point_unusual_in_either_view():
    g = torch.Generator().manual_seed(3)
    # View 0: 3 features at scale 1; view 1: 2 features at scale 1e-3 (as autocorrelations sit beside embeddings).
    def sample(n, shift=(0.0, 0.0)):
        return torch.cat([torch.randn(n, 3, generator=g) + shift[0], 1e-3 * (torch.randn(n, 2, generator=g) + shift[1])], 1)
    model = AnomalyModel.fit(sample(800), ["none"] * 800, view_sizes=(3, 2))
    model.calibrate(sample(1000))
    assert 0.003 < (model.score(sample(2000)).numpy() >= 0.99).mean() < 0.03
    assert (model.score(sample(20, shift=(0.0, 8.0))).numpy() > 0.99).all()  # far only in the small-scale view
    assert (model.score(sample(20, shift=(8.0, 0.0))).numpy() > 0.99).all()
    assert model.view_distances(sample(4)).shape == (4, 2)
    with pytest.raises(ValueError, match="expected 5 columns"):
        model.score(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="view_sizes"):
        AnomalyModel.fit(sample(10), ["none"] * 10, view_sizes=(3, 3))
    with pytest.raises(WaferError, match="no anomaly calibration"):
        AnomalyModel.from_tensors({"wafer.anomaly.view0.means": torch.zeros(1, 2)})
    # A checkpoint from before views (one shared-covariance view) scores exactly as it did.
    single = model.views[0]
    legacy = AnomalyModel.from_tensors({"wafer.anomaly.means": single["means"],
                                        "wafer.anomaly.whiten": single["whiten"] / single["spread"][:, None],
                                        "wafer.anomaly.center": single["center"],
                                        "wafer.anomaly.quantiles": model.quantiles * single["unit"]})
    x = sample(50)
    torch.testing.assert_close(legacy.distance(x[:, :3]), model.view_distances(x)[:, 0] * single["unit"])


def test_fail_autocorrelation_sees_a_lattice_and_keeps_the_symmetry():
    rng = np.random.default_rng(5)
    on = np.hypot(*np.mgrid[-15.5:16, -15.5:16]) < 16
    random_fails = np.where(on, np.where(rng.random((32, 32)) < 0.08, 2, 1), 0)
    rows, cols = np.indices((32, 32))
    lattice = np.where(on, np.where((rows % 4 == 0) & (cols % 4 == 0), 2, 1), 0)
    x = torch.as_tensor(batch_input([random_fails, lattice]))
    a = fail_autocorrelation(x)
    assert a.shape == (2, N_LAG_ORBITS)
    lag_0_4 = [(a_, b_) for b_ in range(1, 7) for a_ in range(b_ + 1)].index((0, 4))
    assert abs(float(a[0, lag_0_4])) < 0.1 and float(a[1, lag_0_4]) > 0.6
    for turned in (torch.rot90(x, 1, (2, 3)), torch.flip(x, (3,))):
        torch.testing.assert_close(fail_autocorrelation(turned), a, atol=1e-4, rtol=1e-4)


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


def test_pattern_thresholds_are_fitted_per_pattern():
    rng = np.random.default_rng(2)
    truth = np.zeros((2000, 2))
    truth[:, 0] = rng.random(2000) < 0.5
    truth[:, 1] = rng.random(2000) < 0.5
    truth[truth.sum(1) == 0, 0] = 1  # every map carries a pattern
    # Pattern 0 separates at 0.5; pattern 1's positives score only 0.3-0.45 (a pattern the model under-rates).
    probs = np.stack([np.where(truth[:, 0] > 0, 0.8, 0.2),
                      np.where(truth[:, 1] > 0, rng.uniform(0.3, 0.45, 2000), rng.uniform(0.0, 0.2, 2000))], 1)
    cut = fit_pattern_thresholds(probs, truth)
    assert cut[0] == pytest.approx(0.5) and 0.2 < cut[1] <= 0.3
    assert fit_pattern_thresholds(probs[:0], truth[:0]).tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="expected equal shapes"):
        fit_pattern_thresholds(probs, truth[:, :1])
    # Three of pattern 0's positives at 0.45: 0.45 is right on three more maps, too few to be told from noise
    # (sign test: 3 < 2 x sqrt(3)), so the cut stays at 0.5; thirty such maps move it.
    for n_low, expected in ((3, 0.5), (30, 0.45)):
        moved = probs.copy()
        moved[np.flatnonzero(truth[:, 0] > 0)[:n_low], 0] = 0.45
        assert fit_pattern_thresholds(moved, truth)[0] == pytest.approx(expected)
    scores = Scores(("A", "B"), probs[:3], np.ones(3), np.zeros(3), pattern_threshold=cut)
    assert [scores.labels(i) for i in range(3)] == [tuple(n for n, t in zip("AB", truth[i]) if t) for i in range(3)]


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
    cut = s.pattern_threshold  # fitted on 0.05..0.95, stored as float16
    assert cut.shape == (8,) and ((0.049 <= cut) & (cut <= 0.951)).all()
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


def test_recipe_starts_from_a_checkpoint_and_rejects_a_mismatch(wafer_checkpoint, tmp_path):
    from mmcore.errors import InputError
    from pipelines.wafer.train import WaferRecipe

    net = WaferRecipe(init=str(wafer_checkpoint)).build_model(None)
    scorer = WaferScorer(wafer_checkpoint)
    torch.testing.assert_close(net.head.weight, scorer.net.head.weight)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(net.eval().embed(x), scorer.net.embed(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="init: .* has head 'core'; this run needs 'linear'"):
        WaferRecipe(init=str(wafer_checkpoint), head="linear").build_model(None)
    with pytest.raises(InputError, match="not a checkpoint folder"):
        WaferRecipe(init=str(tmp_path))
    with pytest.raises(InputError, match="mixed_fraction: expected 0..1"):
        WaferRecipe(mixed_fraction="1.5")


def test_a_save_between_evaluations_refits_the_heads_on_the_current_weights(tmp_path):
    """`--save-every` without `--eval-every`: each periodic checkpoint carries anomaly populations and temperatures
    fitted to the weights it saves, not those of an earlier save."""
    import mmcore
    from pipelines.wafer.train import WaferRecipe

    torch.manual_seed(0)
    recipe = WaferRecipe(n_train=120, n_holdout=90)
    net = recipe.build_model(None)
    card = {"recipe": "wafer"}
    recipe.save(net, tmp_path / "a", card)
    with torch.no_grad():
        for p in net.core.bridge.parameters():
            p.add_(0.5 * torch.randn_like(p))
    recipe.save(net, tmp_path / "b", card)
    recipe.evaluate(net.eval(), None)
    fitted = recipe.anomaly.views[0]["center"].clone()
    recipe.save(net, tmp_path / "c", card)
    centers = [mmcore.load(tmp_path / d).extra_tensors["wafer.anomaly.view0.center"].float() for d in "abc"]
    assert not torch.allclose(centers[0], centers[1], atol=1e-3)  # refitted after the weights moved
    torch.testing.assert_close(centers[1], centers[2], rtol=1e-3, atol=1e-3)  # same weights, same populations
    torch.testing.assert_close(centers[2], fitted.half().float())  # the evaluation's fit is what gets saved
