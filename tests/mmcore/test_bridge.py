import pytest
import torch

from mmcore.bridge import CrossModalBridge
from mmcore.config import BridgeConfig

DIMS = {"image": 24, "volume": 16, "audio": 8}


def make_bridge():
    torch.manual_seed(0)
    return CrossModalBridge(BridgeConfig(dim=32, n_queries=6, n_layers=2, n_heads=4, max_tokens_per_modality=64),
                            DIMS, lm_dim=48).eval()


def tokens(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": (torch.randn(B, 5, 24, generator=g), None),
            "volume": (torch.randn(B, 9, 16, generator=g), torch.ones(B, 9, dtype=torch.bool)),
            "audio": (torch.randn(B, 4, 8, generator=g), None)}


def test_output_shape_for_every_subset_of_modalities():
    bridge = make_bridge()
    full = tokens()
    for subset in (["image"], ["volume"], ["audio"], ["image", "audio"], ["image", "volume", "audio"]):
        out = bridge({k: full[k] for k in subset})
        assert out.shape == (3, 6, 48) and torch.isfinite(out).all()


def test_per_sample_absence_equals_running_without_that_modality():
    bridge = make_bridge()
    full = tokens()
    x, _ = full["image"]
    absent_for_first = torch.tensor([False, True, True])[:, None].expand(3, 5)
    masked = bridge({**full, "image": (x, absent_for_first)})
    without_image = bridge({"volume": full["volume"], "audio": full["audio"]})
    with_image = bridge(full)
    assert (masked[0] - without_image[0]).abs().max() < 1e-5
    assert (masked[1:] - with_image[1:]).abs().max() < 1e-5
    assert (with_image[0] - without_image[0]).abs().max() > 1e-3  # the image did matter
    # masked tokens' values are irrelevant
    garbage = bridge({**full, "image": (x * 0 + 1e4, absent_for_first)})
    assert (garbage[0] - masked[0]).abs().max() < 1e-5


def test_a_sample_with_no_modality_at_all_is_finite():
    bridge = make_bridge()
    x, _ = tokens()["audio"]
    out = bridge({"audio": (x, torch.zeros(3, 4, dtype=torch.bool))})
    assert torch.isfinite(out).all()
    assert (out[0] - out[1]).abs().max() < 1e-6  # nothing present: every sample reads only the null token


def test_bridge_errors_name_the_expected_shape():
    bridge = make_bridge()
    with pytest.raises(ValueError, match=r"image tokens: expected shape \(B, N, 24\)"):
        bridge({"image": (torch.randn(2, 5, 23), None)})
    with pytest.raises(ValueError, match="with B=2"):
        bridge({"image": (torch.randn(2, 5, 24), None), "audio": (torch.randn(3, 4, 8), None)})
    with pytest.raises(ValueError, match=r"audio mask: expected shape \(B, N\) = \(2, 4\)"):
        bridge({"audio": (torch.randn(2, 4, 8), torch.ones(2, 5, dtype=torch.bool))})
    with pytest.raises(ValueError, match="max_tokens_per_modality"):
        bridge({"audio": (torch.randn(1, 65, 8), None)})
    with pytest.raises(ValueError, match="at least one modality"):
        bridge({})
    with pytest.raises(ValueError, match="unknown"):
        CrossModalBridge(BridgeConfig(dim=32, n_heads=4), {"smell": 4}, 16)
    with pytest.raises(ValueError, match="BridgeConfig.dim"):
        CrossModalBridge(BridgeConfig(dim=30, n_heads=4), DIMS, 16)
