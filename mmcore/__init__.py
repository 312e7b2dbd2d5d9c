"""mmcore: image, audio and 3D encoders, a cross-modal attention bridge and a mixture-of-experts language core.

The package imports nothing heavy at import time; submodules pull in torch when they are used.
"""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """A MultimodalModel from a checkpoint directory (config.json, model.safetensors, tokenizer.json, card.json)."""
    from mmcore.checkpoint import load_model

    return load_model(path, device=device)
