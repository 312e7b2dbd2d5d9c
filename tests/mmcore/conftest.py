"""Shared helpers for the core model tests: a small fast multimodal config and synthetic inputs."""

import os

import pytest
import torch

# Nothing may be fetched from the network during tests (timm / Hugging Face weights included).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMM_OFFLINE", "1")


def small_model_config(vocab_size: int = 320):
    """The tiny preset, shrunk further so a training step takes ~0.1 s on one CPU core."""
    from mmcore.config import AudioEncoderConfig, ImageEncoderConfig, VolumeEncoderConfig, preset

    cfg = preset("tiny")
    cfg.lm.vocab_size = vocab_size
    cfg.lm.max_seq_len = 64
    cfg.image = ImageEncoderConfig(model_name="test_efficientnet", img_size=32)
    cfg.volume = VolumeEncoderConfig(dim=32, depth=2, n_heads=4, patch_size=(4, 4, 4), window_size=(2, 2, 2),
                                     n_global_tokens=2, max_grid=(8, 8, 8))
    cfg.audio = AudioEncoderConfig(feature_dim=64, pool_stride=2)
    cfg.bridge.max_tokens_per_modality = 256
    cfg.validate()
    return cfg


def multimodal_inputs(batch: int = 2, depth: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(batch, 3, 32, 32, generator=g),
            "volume": torch.randn(batch, 1, depth, 16, 16, generator=g),
            "audio": torch.randn(batch, 10, 64, generator=g)}


@pytest.fixture
def small_model():
    from mmcore.model import MultimodalModel

    torch.manual_seed(0)
    return MultimodalModel(small_model_config()).eval()


@pytest.fixture
def make_config():
    """small_model_config as a fixture (test modules cannot import conftest under --import-mode=importlib)."""
    return small_model_config


@pytest.fixture
def make_inputs():
    return multimodal_inputs


@pytest.fixture
def single_thread():
    """Small tensors train fastest on one thread, and do not fight other processes on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
