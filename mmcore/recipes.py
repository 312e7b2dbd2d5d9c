"""The `toy` recipe: describe synthetic images, volumes and audio tones in words.

Every sample holds up to three modalities, each absent with probability DROP_PROB:
  image  (3, 32, 32): a small or large red/green/blue square, circle or cross at a random place -> "large red"
  volume (1, D, 16, 16), D in 12..16 slices (padded to 16, masked): a faint or bright Gaussian blob
         at a random depth among the real slices                                              -> "bright blob"
  audio  (20, 64) log-magnitude spectrogram frames (10 ms hop, 16 kHz) of a low (200-400 Hz)
         or high (2-4 kHz) tone in noise, standing in for Whisper encoder features            -> "high tone"
The target text joins the three phrases ("large red, bright blob, high tone"; "no image" when absent). Samples are a
pure function of a seed, so training batches are reproducible per step and the held-out set never overlaps them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mmcore.config import AudioEncoderConfig, ImageEncoderConfig, ModelConfig, preset
from mmcore.train import Recipe, TrainConfig, register_recipe

COLORS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 1.0, 0.1), "blue": (0.1, 0.1, 1.0)}
SHAPES = ("square", "circle", "cross")  # drawn at random, not described
SIZES = {"small": (4, 6), "large": (10, 13)}  # radius range in pixels
LEVELS = {"faint": 0.5, "bright": 2.0}  # blob peak above the 0.1-sigma noise
PITCHES = {"low": (200.0, 400.0), "high": (2000.0, 4000.0)}  # Hz
IMAGE_SIZE, VOLUME_SIZE, MAX_SLICES, MIN_SLICES = 32, 16, 16, 12  # pixels, pixels, slices, slices
SAMPLE_RATE, HOP, N_FFT, AUDIO_FRAMES = 16000, 160, 126, 20  # Hz, samples (10 ms), samples (64 bins), frames
FEATURE_DIM = N_FFT // 2 + 1
DROP_PROB = 0.15
HELD_OUT_SEED = 1_000_003  # the evaluation stream's seed offset; training seeds stay far below it


def _draw_image(g: torch.Generator, color: str, size: str) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(IMAGE_SIZE), torch.arange(IMAGE_SIZE), indexing="ij")
    shape = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=g))]
    r = int(torch.randint(SIZES[size][0], SIZES[size][1] + 1, (1,), generator=g))
    cy, cx = (int(v) for v in torch.randint(r, IMAGE_SIZE - r, (2,), generator=g))
    dy, dx = (yy - cy).abs(), (xx - cx).abs()
    if shape == "square":
        inside = (dy <= r) & (dx <= r)
    elif shape == "circle":
        inside = dy ** 2 + dx ** 2 <= r ** 2
    else:
        inside = ((dy <= r // 3) & (dx <= r)) | ((dx <= r // 3) & (dy <= r))
    image = 0.05 * torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return image + inside.float() * torch.tensor(COLORS[color])[:, None, None]


def _draw_volume(g: torch.Generator, level: str, depth: int) -> torch.Tensor:
    volume = torch.zeros(1, MAX_SLICES, VOLUME_SIZE, VOLUME_SIZE)
    volume[:, :depth] = 0.1 * torch.randn(1, depth, VOLUME_SIZE, VOLUME_SIZE, generator=g)
    cz = 2 + float(torch.rand((), generator=g)) * (depth - 4)
    cy, cx = (float(v) for v in torch.randint(4, VOLUME_SIZE - 4, (2,), generator=g))
    axis = torch.arange(VOLUME_SIZE).float()
    # a separable Gaussian blob: sigma 1 slice in depth, 2.5 pixels in-plane
    gz = torch.exp(-(torch.arange(depth).float() - cz) ** 2 / 2.0)
    gy, gx = torch.exp(-(axis - cy) ** 2 / 12.5), torch.exp(-(axis - cx) ** 2 / 12.5)
    volume[0, :depth] += LEVELS[level] * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    return volume


def _tone_features(g: torch.Generator, pitch: str) -> torch.Tensor:
    lo, hi = PITCHES[pitch]
    freq = lo + (hi - lo) * float(torch.rand((), generator=g))
    n = HOP * (AUDIO_FRAMES - 1)
    t = torch.arange(n) / SAMPLE_RATE
    wave = torch.sin(2 * math.pi * freq * t) + 0.3 * torch.randn(n, generator=g)
    spec = torch.stft(wave, N_FFT, hop_length=HOP, window=torch.hann_window(N_FFT), return_complex=True)
    return (spec.abs() + 1e-3).log().T / 4  # (frames, FEATURE_DIM), roughly unit scale


def toy_samples(n: int, seed: int) -> tuple[dict, list[str]]:
    """n samples from `seed`: model inputs (batched, with masks) and their target descriptions."""
    g = torch.Generator().manual_seed(seed)
    images, volumes, vmasks, audios, imasks, amasks, texts = [], [], [], [], [], [], []
    for _ in range(n):
        color = list(COLORS)[int(torch.randint(len(COLORS), (1,), generator=g))]
        size = list(SIZES)[int(torch.randint(len(SIZES), (1,), generator=g))]
        level = list(LEVELS)[int(torch.randint(len(LEVELS), (1,), generator=g))]
        pitch = list(PITCHES)[int(torch.randint(len(PITCHES), (1,), generator=g))]
        has_image, has_volume, has_audio = (bool(v) for v in torch.rand(3, generator=g) >= DROP_PROB)
        depth = int(torch.randint(MIN_SLICES, MAX_SLICES + 1, (1,), generator=g))
        images.append(_draw_image(g, color, size))
        volumes.append(_draw_volume(g, level, depth))
        vmasks.append(torch.arange(MAX_SLICES) < depth if has_volume else torch.zeros(MAX_SLICES, dtype=torch.bool))
        audios.append(_tone_features(g, pitch))
        imasks.append(has_image)
        amasks.append(torch.full((AUDIO_FRAMES,), has_audio))
        texts.append(", ".join([f"{size} {color}" if has_image else "no image",
                                f"{level} blob" if has_volume else "no volume",
                                f"{pitch} tone" if has_audio else "no audio"]))
    inputs = {"image": torch.stack(images), "image_mask": torch.tensor(imasks),
              "volume": torch.stack(volumes), "volume_mask": torch.stack(vmasks),
              "audio": torch.stack(audios), "audio_mask": torch.stack(amasks)}
    return inputs, texts


def corpus() -> list[str]:
    """Every description the toy task can produce (the tokenizer's training text)."""
    images = [f"{s} {c}" for s in SIZES for c in COLORS] + ["no image"]
    volumes = [f"{level} blob" for level in LEVELS] + ["no volume"]
    audios = [f"{p} tone" for p in PITCHES] + ["no audio"]
    return [", ".join([i, v, a]) for i in images for v in volumes for a in audios]


def toy_model_config(vocab_size: int) -> ModelConfig:
    """The tiny preset with a small timm CNN per image and the toy's audio feature width."""
    cfg = preset("tiny")
    cfg.lm.vocab_size = vocab_size
    cfg.lm.max_seq_len = 64
    cfg.image = ImageEncoderConfig(model_name="test_efficientnet", img_size=IMAGE_SIZE)
    cfg.audio = AudioEncoderConfig(feature_dim=FEATURE_DIM, pool_stride=4)
    cfg.bridge.max_tokens_per_modality = 256
    cfg.validate()
    return cfg


def text_batch(tokenizer, texts: list[str]) -> dict:
    """<bos> text <eos>, right-padded; labels are the text and <eos> (padding and <bos> ignored)."""
    ids, mask = tokenizer.batch_encode(texts, add_bos=True, add_eos=True, padding_side="right")
    labels = ids.masked_fill(~mask, -100)
    labels[:, 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def describe(model, inputs: dict, max_new_tokens: int = 24) -> list[str]:
    """Greedy descriptions of a batch of toy inputs."""
    tok = model.tokenizer
    B = next(v for v in inputs.values() if torch.is_tensor(v)).shape[0]
    prompt = torch.full((B, 1), tok.bos_id, dtype=torch.long)
    out = model.generate(inputs, prompt, max_new_tokens=max_new_tokens, stop_tokens=(tok.eos_id,), pad_id=tok.pad_id)
    return [tok.decode(row).strip() for row in out]


def evaluate_descriptions(model, n: int = 96, seed: int = HELD_OUT_SEED, batch_size: int = 32) -> dict:
    """Accuracy of greedy descriptions on `n` held-out samples: exact match and per modality phrase."""
    model.eval()
    exact, parts, total = 0, [0, 0, 0], 0
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        inputs, texts = toy_samples(count, seed + start)
        for got, want in zip(describe(model, inputs), texts):
            exact += got == want
            got_parts = (got.split(", ") + ["", "", ""])[:3]
            for i, (a, b) in enumerate(zip(got_parts, want.split(", "))):
                parts[i] += a == b
            total += 1
    return {"exact_match": exact / total, "image_accuracy": parts[0] / total, "volume_accuracy": parts[1] / total,
            "audio_accuracy": parts[2] / total, "samples": total}


@register_recipe("toy")
class ToyRecipe(Recipe):
    description = ("synthetic: small/large coloured shapes (32x32 images), faint/bright blobs in 12-16 slice volumes "
                   "and low/high tone spectrograms, each absent 15% of the time, described in words; generated on "
                   "the fly")

    def __init__(self, data: str | None = None, eval_samples: str | int = 96, **options):
        super().__init__(data, **options)
        self.eval_samples = int(eval_samples)

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=600, batch_size=16, lr=3e-3, warmup_steps=20, weight_decay=0.01, log_every=10)

    def build_tokenizer(self, out_dir: Path):
        from mmcore.tokenizer import Tokenizer

        return Tokenizer.train(corpus(), vocab_size=320)

    def build_model(self, tokenizer):
        from mmcore.model import MultimodalModel

        return MultimodalModel(toy_model_config(tokenizer.vocab_size))

    def batch(self, step, micro, rank, world_size, batch_size, tokenizer) -> dict:
        # one seed per (step, micro-step, rank), all far below HELD_OUT_SEED
        seed = ((step * 64 + micro) * 64 + rank) % HELD_OUT_SEED
        inputs, texts = toy_samples(batch_size, seed)
        return {"inputs": inputs, **text_batch(tokenizer, texts)}

    def evaluate(self, model, tokenizer) -> dict:
        return evaluate_descriptions(model, n=self.eval_samples)
