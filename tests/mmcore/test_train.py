import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmcore
from mmcore.train import (RECIPES, Recipe, TrainConfig, UnknownRecipe, get_recipe, lr_factor, register_recipe,
                          run_recipe)

HERE = Path(__file__).parent


def test_warmup_then_cosine_schedule():
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)  # half way through the cosine
    assert lr_factor(110, cfg) == pytest.approx(0.1)


def test_train_config_errors_name_the_field():
    with pytest.raises(ValueError, match="TrainConfig.grad_accum"):
        TrainConfig(grad_accum=0).validate()
    with pytest.raises(ValueError, match="TrainConfig.min_lr_ratio"):
        TrainConfig(min_lr_ratio=2.0).validate()
    assert TrainConfig.from_json(TrainConfig(steps=7).to_json()).steps == 7


def test_registry():
    import mmcore.recipes  # noqa: F401  registers "toy"

    assert "toy" in RECIPES and get_recipe("toy", eval_samples="3").eval_samples == 3
    with pytest.raises(UnknownRecipe, match="known recipes: .*toy"):
        get_recipe("no-such-recipe")
    with pytest.raises(ValueError, match="already taken"):
        register_recipe("toy")(type("Other", (Recipe,), {}))
    with pytest.raises(Exception, match="unknown option"):
        get_recipe("toy", colour="red")


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_resume_continues_from_the_saved_step_with_identical_results(tmp_path, single_thread):
    import mmcore.recipes  # noqa: F401

    common = dict(batch_size=2, warmup_steps=10, progress=False, log_every=1)
    run_recipe(get_recipe("toy", eval_samples=2), tmp_path / "straight", steps=4, **common)
    run_recipe(get_recipe("toy", eval_samples=2), tmp_path / "split", steps=2, **common)
    state = torch.load(tmp_path / "split" / "train_state.pt", weights_only=True)
    assert state["step"] == 2
    summary = run_recipe(get_recipe("toy", eval_samples=2), tmp_path / "split", steps=4, resume=True, **common)
    assert summary["step"] == 4
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]
    straight = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged if "loss" in r] == [r["loss"] for r in straight if "loss" in r]
    card = json.loads((tmp_path / "split" / "card.json").read_text())
    assert card["recipe"] == "toy" and card["steps"] == 4 and "exact_match" in card["metrics"]


@pytest.mark.slow
def test_two_process_ddp_replicas_hold_identical_weights(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_worker.py"), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == 3
    assert r0["state"].keys() == r1["state"].keys()
    differing = [k for k in r0["state"] if not torch.equal(r0["state"][k], r1["state"][k])]
    assert differing == []
    # rank 0 wrote a loadable checkpoint holding those same weights
    loaded = mmcore.load(tmp_path)
    assert torch.equal(loaded.lm.output.weight, r0["state"]["lm.output.weight"])


def run_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: one thread is fastest on a shared machine
    return subprocess.run([sys.executable, "-m", "apps.cli", *args], capture_output=True, text=True, timeout=600,
                          env=env)


def test_cli_trains_the_toy_recipe_into_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "toy"
    result = run_cli("train", "toy", "--steps", "2", "--batch-size", "2", "--out", str(out), "--option",
                     "eval_samples=2", "--no-progress", "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["step"] == 2 and summary["recipe"] == "toy" and summary["eval"]["samples"] == 2
    model = mmcore.load(out)
    assert model.card["recipe"] == "toy" and model.tokenizer is not None
    evaluated = run_cli("eval", "toy", str(out), "--samples", "2", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    assert metrics["samples"] == 2 and 0.0 <= metrics["exact_match"] <= 1.0
    unknown = run_cli("train", "nope")
    assert unknown.returncode == 2 and "known recipes" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    no_state = run_cli("train", "toy", "--out", str(tmp_path / "empty"), "--resume")
    assert no_state.returncode == 2 and "nothing to resume" in no_state.stderr
