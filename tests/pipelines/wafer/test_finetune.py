import numpy as np
import pytest

from apps.cli import main
from pipelines.wafer.finetune import finetune_new_classes, load_fewshot, save_fewshot
from pipelines.wafer.maps import WaferError
from pipelines.wafer.scoring import WaferScorer
from pipelines.wafer.synth import generate


def test_lora_fewshot_adds_a_class_and_keeps_the_old_outputs(wafer_checkpoint, tmp_path):
    scorer = WaferScorer(wafer_checkpoint)
    known = [w.grid for w in generate(6, seed=31)]
    before = scorer.score_grids(known)
    shots = list(generate(12, seed=30, patterns=[("Reticle",)]))
    head, classes = finetune_new_classes(scorer, shots, steps=4, n_negatives=24, batch_size=8)
    assert classes == ["Reticle"]
    base = {n for n, p in scorer.net.named_parameters() if ".lora_" not in n}
    assert not any(p.requires_grad for n, p in scorer.net.named_parameters() if n in base)
    scorer.attach_extra_head(head, classes)
    after = scorer.score_grids(known)
    assert after.extra_probs.shape == (6, 1) and after.extra_classes == ("Reticle",)
    np.testing.assert_allclose(after.defect, before.defect, atol=0.05)  # distillation holds the old outputs

    out = save_fewshot(scorer, head, classes, tmp_path / "adapter", "wafer@test")
    reloaded = WaferScorer(wafer_checkpoint, adapter=out)
    again = reloaded.score_grids(known)
    np.testing.assert_allclose(again.extra_probs, after.extra_probs, atol=1e-5)
    np.testing.assert_allclose(again.pattern_probs, after.pattern_probs, atol=1e-5)


def test_fewshot_needs_a_new_class(wafer_checkpoint, tmp_path):
    scorer = WaferScorer(wafer_checkpoint)
    with pytest.raises(WaferError, match="no label outside the known classes"):
        finetune_new_classes(scorer, list(generate(4, seed=1, patterns=[("Center",)])), steps=1)
    with pytest.raises(WaferError, match="not a wafer few-shot adapter folder"):
        load_fewshot(scorer, tmp_path)


def test_finetune_cli(wafer_checkpoint, tmp_path, capsys):
    assert main(["wafer", "synth", str(tmp_path / "shots"), "--n", "10", "--seed", "40", "--patterns",
                 "Half,none"]) == 0
    assert main(["finetune", "wafer", "--lora", "--data", str(tmp_path / "shots"), "--checkpoint",
                 str(wafer_checkpoint), "--out", str(tmp_path / "ad"), "--steps", "2", "--device", "cpu"]) == 0
    assert "learned Half from" in capsys.readouterr().out
    assert (tmp_path / "ad" / "adapter.safetensors").is_file() and (tmp_path / "ad" / "fewshot.json").is_file()
    assert main(["finetune", "wafer", "--lora", "--data", str(tmp_path / "nothing")]) == 2
