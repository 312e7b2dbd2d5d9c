import json

import pytest
import torch

import mmcore
from mmcore.model import MultimodalModel
from mmcore.tokenizer import Tokenizer


@pytest.fixture
def trained_like(small_model):
    """A model whose weights are not at their init (so fp16 rounding shows), with a tokenizer."""
    with torch.no_grad():
        for p in small_model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    small_model.tokenizer = Tokenizer.train(["a red circle", "blob top"] * 10, vocab_size=300)
    return small_model


def test_save_load_gives_identical_logits(trained_like, make_inputs, tmp_path):
    inputs, ids = make_inputs(), torch.randint(4, 290, (2, 6))
    head = torch.randn(3, 64)
    trained_like.save(tmp_path / "ckpt", extra_config={"classes": ["a", "b", "c"]}, extra_tensors={"head.w": head},
                      card={"recipe": "unit", "metrics": {"acc": 0.5}})
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                              "card.json"}
    loaded = mmcore.load(tmp_path / "ckpt")
    with torch.no_grad():
        want = trained_like(inputs, ids).logits
        got = loaded(inputs, ids).logits
    assert torch.equal(got, want)
    assert loaded.extra_config == {"classes": ["a", "b", "c"]}
    assert torch.equal(loaded.extra_tensors["head.w"], head)
    assert loaded.tokenizer.encode("a red circle") == trained_like.tokenizer.encode("a red circle")
    card = json.loads((tmp_path / "ckpt" / "card.json").read_text())
    assert card["recipe"] == "unit" and card["metrics"] == {"acc": 0.5}
    assert card["parameters"] == trained_like.num_params() and card["storage_dtype"] == "float32"
    assert "commit" in card and loaded.card["recipe"] == "unit"
    assert loaded.cfg.to_dict() == trained_like.cfg.to_dict()


def test_fp16_storage_loads_to_fp32_and_stays_close(trained_like, make_inputs, tmp_path):
    inputs, ids = make_inputs(), torch.randint(4, 290, (2, 6))
    trained_like.save(tmp_path / "f32")
    trained_like.save(tmp_path / "f16", dtype=torch.float16)
    size32 = (tmp_path / "f32" / "model.safetensors").stat().st_size
    size16 = (tmp_path / "f16" / "model.safetensors").stat().st_size
    assert size16 < 0.55 * size32
    loaded = mmcore.load(tmp_path / "f16")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    with torch.no_grad():
        want = trained_like(inputs, ids).logits
        got = loaded(inputs, ids).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_resave_keeps_other_files_and_drops_stale_tokenizer(trained_like, tmp_path):
    trained_like.save(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    trained_like.tokenizer = None
    trained_like.save(tmp_path)
    assert (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tokenizer.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_load_errors_name_the_file(trained_like, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        mmcore.load(tmp_path / "nothing")
    trained_like.save(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match=r"config.json: expected an mmcore checkpoint"):
        mmcore.load(tmp_path / "c")
    trained_like.save(tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    config["model"]["bridge"]["n_queries"] = 4
    (tmp_path / "d" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model.safetensors: weights do not match config.json"):
        mmcore.load(tmp_path / "d")
    with pytest.raises(ValueError, match="dtype"):
        trained_like.save(tmp_path / "e", dtype=torch.int8)


def test_whisper_sourced_model_loads_without_the_whisper_file(make_config, tmp_path):
    import dataclasses

    from whisper.model import ModelDimensions, Whisper

    from mmcore.config import AudioEncoderConfig

    dims = ModelDimensions(n_mels=16, n_audio_ctx=20, n_audio_state=32, n_audio_head=4, n_audio_layer=1,
                           n_vocab=64, n_text_ctx=8, n_text_state=32, n_text_head=4, n_text_layer=1)
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": Whisper(dims).state_dict()}, tmp_path / "w.pt")
    cfg = make_config()
    cfg.image = cfg.volume = None
    cfg.audio = AudioEncoderConfig(source="whisper", feature_dim=32, whisper_checkpoint=str(tmp_path / "w.pt"))
    model = MultimodalModel(cfg).eval()
    model.save(tmp_path / "ckpt")
    (tmp_path / "w.pt").unlink()  # the checkpoint carries the encoder weights and its dims
    loaded = mmcore.load(tmp_path / "ckpt")
    mel, ids = torch.randn(1, 16, 40), torch.randint(4, 300, (1, 4))
    with torch.no_grad():
        assert torch.equal(loaded({"audio": mel}, ids).logits, model({"audio": mel}, ids).logits)
