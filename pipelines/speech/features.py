"""Audio tokens for the core: the Whisper encoder's output for a voice note, from the same weights that transcribe it.

One row per 20 ms of audio (T = ceil(seconds / 0.02), 1500 per 30 s window), `d_model` wide (512 for Whisper base),
as `mmcore`'s audio encoder path (`AudioEncoderConfig(source="features")`) expects under the input key "audio".
Notes of different lengths are padded into one batch with a mask that marks the real frames.
"""

from __future__ import annotations

import numpy as np

from pipelines.speech.audio import Audio
from pipelines.speech.engines import Transcriber


def note_features(transcriber: Transcriber, audio: Audio | np.ndarray):
    """(T, d_model) float32 torch tensor for one note."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(transcriber.encode(audio)))


def batch_features(transcriber: Transcriber, notes: list[Audio | np.ndarray], max_frames: int | None = None):
    """{"audio": (B, T_max, d_model) float32, "audio_mask": (B, T_max) bool, True = real frame} for MultimodalModel.

    `max_frames` keeps the first frames of longer notes (e.g. the bridge's position budget)."""
    import torch

    if not notes:
        raise ValueError("batch_features: expected at least one note")
    feats = [note_features(transcriber, n) for n in notes]
    if max_frames is not None:
        if max_frames <= 0:
            raise ValueError(f"batch_features: max_frames must be positive, found {max_frames}")
        feats = [f[:max_frames] for f in feats]
    t_max = max(f.shape[0] for f in feats)
    audio = torch.zeros(len(feats), t_max, feats[0].shape[1])
    mask = torch.zeros(len(feats), t_max, dtype=torch.bool)
    for i, f in enumerate(feats):
        audio[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = True
    return {"audio": audio, "audio_mask": mask}
