"""Byte-level BPE tokenizer trained with the `tokenizers` library, saved as tokenizer.json beside the weights.

Byte-level means every string encodes (no unknown token) and decoding gives back the exact text. The special tokens
come first, so their ids are fixed: <pad>=0, <bos>=1, <eos>=2, <sep>=3, then task tokens a recipe adds.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

import torch

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<sep>")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte plus the special tokens


class Tokenizer:
    def __init__(self, backend):
        """Wrap a `tokenizers.Tokenizer`; build one with `Tokenizer.train` or `Tokenizer.load`."""
        self.backend = backend
        for name in SPECIAL_TOKENS:
            if backend.token_to_id(name) is None:
                raise ValueError(f"tokenizer: special token {name} is missing from the vocabulary")
        self.pad_id, self.bos_id, self.eos_id, self.sep_id = (backend.token_to_id(t) for t in SPECIAL_TOKENS)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, extra_special_tokens: Iterable[str] = ()) -> Tokenizer:
        """Learn byte-level BPE merges from `texts` up to `vocab_size` ids (specials included)."""
        from tokenizers import Tokenizer as Backend
        from tokenizers import decoders, models, pre_tokenizers, trainers

        specials = list(SPECIAL_TOKENS) + [t for t in extra_special_tokens if t not in SPECIAL_TOKENS]
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
            raise ValueError(f"vocab_size: expected an integer >= {256 + len(specials)} (256 bytes + "
                             f"{len(specials)} special tokens), found {vocab_size!r}")
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator((t for t in texts if isinstance(t, str)), trainer=trainer)
        return cls(backend)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a tokenizer.json file or a checkpoint directory holding one."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            return cls(Backend.from_file(str(path)))
        except Exception as exc:  # the Rust library raises its own exception type
            raise ValueError(f"{path}: not a valid tokenizer.json ({exc})") from exc

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json atomically (to a file path, or into a directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tokenizer-", suffix=".json")
        os.close(fd)
        try:
            self.backend.save(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """Id of a special or task token; KeyError when the vocabulary lacks it."""
        found = self.backend.token_to_id(token)
        if found is None:
            raise KeyError(f"tokenizer: no token {token!r}")
        return found

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text: expected a string, found {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids, *, skip_special: bool = True) -> str:
        if torch.is_tensor(ids):
            ids = ids.tolist()
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def batch_encode(self, texts: list[str], *, add_bos: bool = True, add_eos: bool = False,
                     padding_side: str = "left", max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, T) long, attention_mask (B, T) bool). Left padding (the default) suits generation: every prompt
        ends at the last column. With max_length, longer texts keep their last tokens (left) or first (right)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', found {padding_side!r}")
        rows = [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
        if max_length is not None:
            rows = [r[-max_length:] if padding_side == "left" else r[:max_length] for r in rows]
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
            ids[i, span] = torch.tensor(r, dtype=torch.long)
            mask[i, span] = True
        return ids, mask
