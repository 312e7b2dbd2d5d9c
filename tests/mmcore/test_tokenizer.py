import pytest
import torch

from mmcore.tokenizer import Tokenizer

CORPUS = ["a red circle, blob top, high tone", "no image, blob bottom, low tone",
          "the liver measures 15 cm", "Hounsfield units: -1000 air, 0 water"] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=300, extra_special_tokens=["<report>"])


def test_special_ids_and_round_trip(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id) == (0, 1, 2, 3)
    assert tok.token_id("<report>") == 4
    assert 260 < tok.vocab_size <= 300
    for text in ["a red circle", "unseen wörds ✓ 3 mm³", "  spaces\nand lines"]:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == 1 and ids[-1] == 2
        assert tok.decode(ids) == text  # byte-level: exact, even for unseen characters
    assert len(tok.encode("blob bottom", add_bos=False)) < len("blob bottom")  # merges were learned


def test_batch_encode_left_pads_for_generation(tok):
    ids, mask = tok.batch_encode(["a", "a red circle"])
    assert ids.shape == mask.shape and ids.dtype == torch.long
    assert mask[1].all() and not mask[0, 0]
    assert ids[0, -1] == ids[1, -1] or mask[0, -1]  # every row ends in the last column
    assert (ids[~mask] == tok.pad_id).all()
    right, rmask = tok.batch_encode(["a", "a red circle"], padding_side="right", add_eos=True)
    assert rmask[0, 0] and not rmask[0, -1] and right[0, rmask[0].sum() - 1] == tok.eos_id
    clipped, _ = tok.batch_encode(["a red circle, blob top"], max_length=3)
    assert clipped.shape == (1, 3)


def test_save_load_identical(tok, tmp_path):
    path = tok.save(tmp_path)
    assert path.name == "tokenizer.json"
    again = Tokenizer.load(tmp_path)
    text = "Hounsfield units: -1000 air"
    assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing.json")


def test_vocab_size_too_small_names_the_field():
    with pytest.raises(ValueError, match="vocab_size: expected an integer >= 260"):
        Tokenizer.train(CORPUS, vocab_size=100)
