import pytest
import torch

from mmcore.model import MultimodalModel
from mmcore.recipes import corpus, text_batch, toy_samples
from mmcore.tokenizer import Tokenizer



def test_forward_shapes_and_prefix_matters(small_model, make_inputs):
    multimodal_inputs = make_inputs
    inputs = multimodal_inputs()
    ids = torch.randint(4, 300, (2, 7))
    out = small_model(inputs, ids)
    Q = small_model.cfg.bridge.n_queries
    assert out.logits.shape == (2, Q + 7, 320) and out.hidden.shape == (2, Q + 7, 64) and out.loss is None
    assert small_model.encode(inputs).shape == (2, Q, 64)
    other = small_model(multimodal_inputs(seed=1), ids)
    assert (other.logits[:, -1] - out.logits[:, -1]).abs().max() > 1e-4  # the text sees the modalities
    text_only = small_model(None, ids)
    assert text_only.logits.shape == (2, 7, 320)
    assert small_model.pooled(inputs, ids).shape == (2, 64)


def test_generate_score_and_left_padded_prompts(small_model, make_inputs):
    multimodal_inputs = make_inputs
    inputs = multimodal_inputs()
    ids = torch.tensor([[0, 0, 1, 40], [1, 50, 60, 70]])
    mask = ids != 0
    new = small_model.generate(inputs, ids, attention_mask=mask, max_new_tokens=5)
    assert new.shape == (2, 5)
    # the padded first row generates what it generates alone
    alone = small_model.generate({k: v[:1] for k, v in inputs.items()}, ids[:1, 2:], max_new_tokens=5)
    assert torch.equal(new[:1], alone)
    scores = small_model.score(inputs, ids, [[5, 6], [7]], attention_mask=mask)
    assert scores.shape == (2, 2) and (scores < 0).all()


def test_per_sample_absent_modality(small_model, make_inputs):
    multimodal_inputs = make_inputs
    inputs = multimodal_inputs()
    absent_image = {**inputs, "image_mask": torch.tensor([False, True])}
    ids = torch.randint(4, 300, (2, 5))
    a = small_model(absent_image, ids).logits
    b = small_model({"volume": inputs["volume"], "audio": inputs["audio"]}, ids).logits
    assert (a[0] - b[0]).abs().max() < 1e-4
    no_volume = {**inputs, "volume_mask": torch.tensor([[True] * 8, [False] * 8])}
    c = small_model(no_volume, ids).logits
    d = small_model({"image": inputs["image"], "audio": inputs["audio"]}, ids).logits
    assert (c[1] - d[1]).abs().max() < 1e-4


def test_input_errors_name_the_key_and_shape(small_model, make_inputs, make_config):
    multimodal_inputs, small_model_config = make_inputs, make_config
    inputs = multimodal_inputs()
    ids = torch.randint(4, 300, (2, 5))
    with pytest.raises(ValueError, match="unknown key"):
        small_model({"smell": torch.zeros(2)}, ids)
    with pytest.raises(ValueError, match=r"volume: expected shape \(B, 1, D, H, W\)"):
        small_model({"volume": torch.randn(2, 8, 16, 16)}, ids)
    with pytest.raises(ValueError, match=r"image_mask: expected shape \(B,\) = \(2,\)"):
        small_model({**inputs, "image_mask": torch.ones(3, dtype=torch.bool)}, ids)
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(B, T\)"):
        small_model(inputs, ids, attention_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="float tensor"):
        small_model({"audio": torch.zeros(2, 10, 64, dtype=torch.long)}, ids)
    cfg = small_model_config()
    cfg.image = None
    with pytest.raises(ValueError, match=r"ModelConfig.image is None"):
        MultimodalModel(cfg)({"image": inputs["image"]}, ids)


def test_bad_model_config_names_the_field(make_config):
    small_model_config = make_config
    cfg = small_model_config()
    cfg.lm.moe.top_k = 99
    with pytest.raises(ValueError, match="MoEConfig.top_k"):
        MultimodalModel(cfg)
    cfg = small_model_config()
    cfg.bridge.n_heads = 5
    with pytest.raises(ValueError, match="BridgeConfig.dim"):
        MultimodalModel(cfg)


def test_tiny_multimodal_model_overfits_one_batch(make_config, single_thread):
    small_model_config = make_config
    """Image + volume + audio tokens -> description; loss on one fixed batch falls below 0.05."""
    torch.manual_seed(0)
    tok = Tokenizer.train(corpus(), vocab_size=320)
    inputs, texts = toy_samples(4, seed=7)
    inputs = {k: v for k, v in inputs.items() if not k.endswith("_mask")}  # all three modalities present
    inputs["volume"] = inputs["volume"][:, :, :8]
    batch = text_batch(tok, texts)
    model = MultimodalModel(small_model_config(tok.vocab_size)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss = model(inputs, batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_router_bias()
        losses.append(loss.item())
        if loss.item() < 0.05:
            break
    assert losses[0] > 3.0
    assert min(losses) < 0.05, losses[-5:]
