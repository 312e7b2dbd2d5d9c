"""The audio path carries information into the core: a tiny MultimodalModel that sees only the Whisper encoder
states of a dictation learns which of two phrases was spoken, and gets it right for voices/speeds it never saw."""

import importlib.util

import pytest

pytestmark = [pytest.mark.slow,  # 18 Whisper windows to encode, then a short training run
              pytest.mark.skipif(importlib.util.find_spec("mmcore.model") is None,
                                 reason="mmcore.model is not part of this build")]

PHRASES = ("The nodule has grown since the last scan.", "The nodule is stable since the last scan.")
VOICES = ("en-us", "en-us+f2", "en-gb")
SPEEDS = (135, 160, 185)


def test_a_tiny_core_tells_two_spoken_phrases_apart_from_audio_tokens(base_transcriber, dictate):
    import torch
    import torch.nn as nn

    from mmcore.config import AudioEncoderConfig, BridgeConfig, preset
    from mmcore.model import MultimodalModel
    from pipelines.speech.features import batch_features

    clips, labels, held_out = [], [], []
    for v, voice in enumerate(VOICES):
        for s, speed in enumerate(SPEEDS):
            for label, phrase in enumerate(PHRASES):
                clips.append(dictate(phrase, voice, speed))
                labels.append(label)
                held_out.append((v + s) % 3 == 0)  # one speed per voice never seen in training
    batch = batch_features(base_transcriber, clips)  # {"audio": (18, T, 512), "audio_mask": (18, T)}
    assert batch["audio"].shape[-1] == 512
    labels, test = torch.tensor(labels), torch.tensor(held_out)
    train = ~test

    cfg = preset("tiny")
    cfg.image = cfg.volume = None
    cfg.audio = AudioEncoderConfig(source="features", feature_dim=512, pool_stride=2)
    cfg.bridge = BridgeConfig(dim=64, n_queries=4, n_layers=1, n_heads=4)
    torch.manual_seed(0)
    model = MultimodalModel(cfg)
    head = nn.Linear(cfg.lm.dim, 2)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=2e-3, weight_decay=0.01)

    def logits(index):
        return head(model.pooled({"audio": batch["audio"][index], "audio_mask": batch["audio_mask"][index]}))

    with torch.no_grad():
        before = nn.functional.cross_entropy(logits(train), labels[train]).item()
    for _ in range(60):
        loss = nn.functional.cross_entropy(logits(train), labels[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * before
    model.eval()
    with torch.no_grad():
        accuracy = (logits(test).argmax(-1) == labels[test]).float().mean().item()
    assert int(test.sum()) == 6 and accuracy >= 5 / 6
