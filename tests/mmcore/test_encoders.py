import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mmcore.config import AudioEncoderConfig, ImageEncoderConfig, VolumeEncoderConfig
from mmcore.encoders import volume as volume_mod
from mmcore.encoders.audio import AudioEncoder, pool_frames
from mmcore.encoders.image import ImageEncoder, PretrainedWeightsMissing
from mmcore.encoders.volume import (SliceVolumeEncoder, WindowGlobalAttention, WindowVolumeEncoder,
                                    effective_window)


def volume_config(**kw) -> VolumeEncoderConfig:
    base = dict(dim=32, depth=2, n_heads=4, patch_size=(2, 4, 4), window_size=(2, 2, 2), n_global_tokens=2,
                max_grid=(16, 16, 16))
    return VolumeEncoderConfig(**{**base, **kw})


# ---- window3d attention -------------------------------------------------------------------------------------------

def dense_reference(att: WindowGlobalAttention, x, g, valid, window, shift):
    """The same attention as one dense SDPA over [globals, patches] with an explicit boolean pattern."""
    B, Z, Y, X, C = x.shape
    G, N = g.shape[1], Z * Y * X
    coords = torch.stack(torch.meshgrid(torch.arange(Z), torch.arange(Y), torch.arange(X), indexing="ij"), -1)
    window_id = (coords.reshape(N, 3) + torch.tensor(shift)) // torch.tensor(window)  # shifted partition
    same_window = (window_id[:, None] == window_id[None, :]).all(-1)  # (N, N)
    real = valid.reshape(B, N)
    allowed = torch.zeros(B, G + N, G + N, dtype=torch.bool)
    allowed[:, :, :G] = True  # everyone sees the global tokens
    allowed[:, :G, G:] = real[:, None, :]  # globals see every real patch
    allowed[:, G:, G:] = same_window[None] & real[:, None, :]  # patches see real patches of their window only
    seq = torch.cat([g, x.reshape(B, N, C)], 1)
    q, k, v = (t.unflatten(-1, (att.n_heads, -1)).transpose(1, 2) for t in att.qkv(seq).chunk(3, -1))
    out = att.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None]).transpose(1, 2).flatten(2))
    return out[:, G:].reshape(B, Z, Y, X, C), out[:, :G], allowed


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("grid", [(3, 5, 4), (4, 4, 4), (1, 6, 3)])
def test_window_attention_equals_dense_masked_reference(shifted, grid):
    torch.manual_seed(0)
    att = WindowGlobalAttention(16, 2)
    B, G = 2, 3
    x, g = torch.randn(B, *grid, 16), torch.randn(B, G, 16)
    valid = torch.ones(B, *grid, dtype=torch.bool)
    valid[1, grid[0] // 2:] = False  # the second volume is shorter
    window, shift = effective_window(grid, (2, 2, 2), shifted)
    out_x, out_g = att(x, g, valid, window, shift)
    ref_x, ref_g, allowed = dense_reference(att, x, g, valid, window, shift)
    assert (out_g - ref_g).abs().max() < 1e-5
    real = valid.unsqueeze(-1)
    assert ((out_x - ref_x).abs() * real).max() < 1e-5
    # the pattern is sparse: every patch query sees at most window + G keys
    n_window = window[0] * window[1] * window[2]
    assert allowed[:, G:].sum(-1).max() <= n_window + G
    if shifted and grid == (4, 4, 4):
        assert shift == (1, 1, 1)


def test_window_attention_cost_grows_linearly_with_patches(monkeypatch):
    """Count the query-key pairs the attention computes: doubling the patches doubles them."""
    pairs = []
    real_sdpa = F.scaled_dot_product_attention

    def counting(q, k, v, attn_mask=None):
        pairs.append(q.shape[0] * q.shape[2] * k.shape[2])
        return real_sdpa(q, k, v, attn_mask=attn_mask)

    monkeypatch.setattr(volume_mod.F, "scaled_dot_product_attention", counting)
    att = WindowGlobalAttention(16, 2)
    cost = {}
    for Z in (8, 16, 32):
        pairs.clear()
        grid = (Z, 8, 8)
        att(torch.randn(1, *grid, 16), torch.randn(1, 2, 16), torch.ones(1, *grid, dtype=torch.bool), (2, 2, 2),
            (0, 0, 0))
        cost[Z] = sum(pairs)
    assert cost[16] / cost[8] == pytest.approx(2.0, rel=0.02)
    assert cost[32] / cost[16] == pytest.approx(2.0, rel=0.02)
    N = 32 * 8 * 8
    assert cost[32] < N * N / 20  # far below dense attention's N^2


def test_window3d_padding_slices_are_irrelevant():
    torch.manual_seed(0)
    enc = WindowVolumeEncoder(volume_config()).eval()
    real = torch.randn(2, 1, 7, 16, 16)
    padded = torch.cat([real, 5 * torch.randn(2, 1, 5, 16, 16)], dim=2)  # 12 slices, the last 5 padding
    mask = torch.arange(12)[None].expand(2, 12) < 7
    tokens_a, mask_a = enc(padded, mask)
    padded_b = padded.clone()
    padded_b[:, :, 7:] = -3.0  # different padding content
    tokens_b, mask_b = enc(padded_b, mask)
    assert torch.equal(mask_a, mask_b)
    assert (tokens_a - tokens_b).abs().max() < 1e-5
    # ... and equal to encoding the unpadded 7-slice volume: real tokens match, padding patches are masked
    tokens_c, mask_c = enc(real)
    n_real = mask_c.shape[1]
    assert mask_a[:, :n_real].all() and not mask_a[:, n_real:].any()
    assert (tokens_a[:, :2] - tokens_c[:, :2]).abs().max() < 1e-4  # global tokens
    G = 2
    grid_a, grid_c = (6, 4, 4), (4, 4, 4)  # 12 vs 7 slices -> patch rows of 2 slices
    real_a = tokens_a[:, G:].reshape(2, *grid_a, -1)[:, :4].reshape(2, -1, 32)
    assert (real_a - tokens_c[:, G:]).abs().max() < 1e-4
    assert tokens_a[:, n_real:].abs().max() == 0  # masked tokens carry zeros


def test_window3d_shapes_and_errors():
    enc = WindowVolumeEncoder(volume_config())
    tokens, mask = enc(torch.randn(1, 1, 6, 16, 8))
    assert tokens.shape == (1, 2 + 3 * 4 * 2, 32) and mask.all()
    with pytest.raises(ValueError, match=r"expected shape \(B, 1, D, H, W\)"):
        enc(torch.randn(1, 6, 16, 16))
    with pytest.raises(ValueError, match=r"divisible by patch_size \(4, 4\)"):
        enc(torch.randn(1, 1, 6, 15, 16))
    with pytest.raises(ValueError, match=r"volume_mask: expected shape \(B, D\) = \(1, 6\)"):
        enc(torch.randn(1, 1, 6, 16, 16), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_grid"):
        WindowVolumeEncoder(volume_config(max_grid=(2, 8, 8)))(torch.randn(1, 1, 8, 16, 16))
    with pytest.raises(ValueError, match="n_global_tokens"):
        WindowVolumeEncoder(volume_config(n_global_tokens=0))


def test_volume_config_errors_name_the_field():
    with pytest.raises(ValueError, match="VolumeEncoderConfig.dim"):
        volume_config(dim=30, n_heads=4).validate()
    with pytest.raises(ValueError, match="VolumeEncoderConfig.variant"):
        volume_config(variant="cube").validate()
    with pytest.raises(ValueError, match="VolumeEncoderConfig.window_size"):
        volume_config(window_size=(2, 2)).validate()


def test_slice2d_pools_real_slices_only():
    torch.manual_seed(0)
    cfg = volume_config(variant="slice2d", slice_model_name="test_efficientnet")
    enc = SliceVolumeEncoder(cfg).eval()
    volume = torch.randn(2, 1, 6, 32, 32)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    tokens, out_mask = enc(volume, mask)
    assert tokens.shape == (2, 2 + 6, 32)
    assert out_mask.tolist() == [[True] * 8, [True] * 6 + [False] * 2]
    changed = volume.clone()
    changed[1, :, 4:] = 100.0
    tokens_b, _ = enc(changed, mask)
    assert (tokens - tokens_b).abs().max() < 1e-5
    assert not torch.isnan(enc(volume, torch.zeros(2, 6, dtype=torch.bool))[0]).any()  # absent volume: finite


# ---- image --------------------------------------------------------------------------------------------------------

def test_image_encoder_tokens_for_cnn_and_vit():
    cnn = ImageEncoder(ImageEncoderConfig(model_name="test_resnet", img_size=64))
    tokens = cnn(torch.randn(2, 3, 64, 64))
    assert tokens.shape[0] == 2 and tokens.shape[2] == cnn.out_dim == 96 and tokens.shape[1] >= 1
    vit = ImageEncoder(ImageEncoderConfig(model_name="test_vit", img_size=32))
    assert vit(torch.randn(2, 3, 32, 32)).shape[-1] == vit.out_dim
    with pytest.raises(ValueError, match=r"image: expected shape \(B, 3, H, W\)"):
        cnn(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match="ImageEncoderConfig.model_name"):
        ImageEncoder(ImageEncoderConfig(model_name="no_such_net"))


def test_pretrained_weights_are_never_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(PretrainedWeightsMissing, match="checkpoint_path") as err:
        ImageEncoder(ImageEncoderConfig(model_name="resnet18", pretrained=True))
    assert "never downloaded" in str(err.value)
    with pytest.raises(FileNotFoundError, match="ImageEncoderConfig.checkpoint_path"):
        ImageEncoder(ImageEncoderConfig(model_name="test_resnet", checkpoint_path=str(tmp_path / "none.pth")))


def test_checkpoint_path_loads_local_weights(tmp_path):
    import timm

    torch.manual_seed(1)
    source = timm.create_model("test_resnet", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    enc = ImageEncoder(ImageEncoderConfig(model_name="test_resnet", checkpoint_path=str(tmp_path / "weights.pth")))
    for name, p in enc.backbone.state_dict().items():
        assert torch.equal(p, source.state_dict()[name]), name  # everything but the dropped classifier


# ---- audio --------------------------------------------------------------------------------------------------------

def make_whisper_checkpoint(path, n_mels=16, n_ctx=20, n_state=32):
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(0)
    dims = ModelDimensions(n_mels=n_mels, n_audio_ctx=n_ctx, n_audio_state=n_state, n_audio_head=4, n_audio_layer=2,
                           n_vocab=64, n_text_ctx=8, n_text_state=n_state, n_text_head=4, n_text_layer=1)
    model = Whisper(dims)
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": model.state_dict()}, path)
    return model


def test_whisper_checkpoint_loads_and_matches_openai_whisper(tmp_path):
    reference = make_whisper_checkpoint(tmp_path / "tiny-whisper.pt").eval()
    cfg = AudioEncoderConfig(source="whisper", feature_dim=32, whisper_checkpoint=str(tmp_path / "tiny-whisper.pt"),
                             pool_stride=1)
    enc = AudioEncoder(cfg)
    assert cfg.whisper_dims["n_audio_layer"] == 2
    assert all(not p.requires_grad for p in enc.parameters())  # frozen by default
    mel = torch.randn(3, 16, 40)  # the full 2 * n_audio_ctx frames whisper expects
    with torch.no_grad():
        want = reference.encoder(mel)
    got, mask = enc(mel)
    assert got.shape == want.shape == (3, 20, 32) and mask.all()
    assert (got - want).abs().max() < 1e-5
    pooled, pooled_mask = AudioEncoder(dataclasses.replace(cfg, pool_stride=4))(mel, torch.ones(3, 40).bool())
    assert pooled.shape == (3, 5, 32)
    assert (pooled - want.view(3, 5, 4, 32).mean(2)).abs().max() < 1e-5


def test_whisper_loader_errors(tmp_path):
    make_whisper_checkpoint(tmp_path / "w.pt")
    with pytest.raises(ValueError, match="AudioEncoderConfig.feature_dim: 64 does not match"):
        AudioEncoder(AudioEncoderConfig(source="whisper", feature_dim=64, whisper_checkpoint=str(tmp_path / "w.pt")))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not in openai-whisper format"):
        AudioEncoder(AudioEncoderConfig(source="whisper", feature_dim=32, whisper_checkpoint=str(tmp_path / "bad.pt")))
    with pytest.raises(FileNotFoundError, match="whisper_checkpoint"):
        AudioEncoder(AudioEncoderConfig(source="whisper", feature_dim=32, whisper_checkpoint=str(tmp_path / "x.pt")))
    enc = AudioEncoder(AudioEncoderConfig(source="whisper", feature_dim=32, whisper_checkpoint=str(tmp_path / "w.pt")))
    with pytest.raises(ValueError, match=r"log-mel spectrogram \(B, 16, frames\)"):
        enc(torch.randn(1, 80, 40))


def test_feature_pooling_ignores_padded_frames():
    enc = AudioEncoder(AudioEncoderConfig(feature_dim=8, pool_stride=3))
    x = torch.randn(2, 7, 8)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    tokens, out_mask = enc(x, mask)
    assert tokens.shape == (2, 3, 8)
    assert out_mask.tolist() == [[True, True, True], [True, True, False]]
    assert torch.allclose(tokens[1, 1], x[1, 3])  # the second group holds one real frame
    assert torch.allclose(tokens[0, 2], x[0, 6])
    assert torch.allclose(tokens[0, 0], x[0, :3].mean(0))
    with pytest.raises(ValueError, match=r"audio: expected Whisper encoder features \(B, T, 8\)"):
        enc(torch.randn(2, 7, 9))
    same, _ = pool_frames(x, torch.ones(2, 7, dtype=torch.bool), 1)
    assert torch.equal(same, x)
