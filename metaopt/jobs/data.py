"""Language-modelling data: a text encoded by character, or a tokenized corpus in nanoGPT's format.

Each gives a train and a validation split and reproducible random batches of windows; the same
generator draws the same offsets from either (`TokenDataset` of a text's character ids equals
`CharDataset` of that text).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch

Tensor = torch.Tensor

#: the packaged corpus (tiny Shakespeare, 1,115,394 characters, 65 distinct)
PACKAGED_TEXT = "tinyshakespeare.txt"


def packaged_text() -> str:
    """The packaged corpus (tiny Shakespeare), read from the package's data directory."""
    return resources.files("metaopt.jobs").joinpath("data", PACKAGED_TEXT).read_text(encoding="utf-8")


class CharDataset:
    """A text encoded character by character.

    The alphabet is the sorted set of characters of the whole text; the first
    ``1 - val_fraction`` of the text is the training split, the rest the validation split (a
    contiguous tail, so no validation window overlaps a training window).
    """

    def __init__(self, text: str, val_fraction: float = 0.1, device: str | torch.device = "cpu") -> None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        self.chars = sorted(set(text))
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        data = torch.tensor([self.stoi[ch] for ch in text], dtype=torch.long)
        n_train = int(len(data) * (1.0 - val_fraction))
        self.train = data[:n_train].to(device)
        self.val = data[n_train:].to(device)
        self.device = torch.device(device)

    @classmethod
    def from_source(cls, path: str | Path | None, val_fraction: float = 0.1, device="cpu") -> CharDataset:
        """The packaged text when ``path`` is None, else the UTF-8 text file at ``path``."""
        text = packaged_text() if path is None else Path(path).read_text(encoding="utf-8")
        return cls(text, val_fraction, device)

    @property
    def vocab_size(self) -> int:
        """The number of distinct characters of the text."""
        return len(self.chars)

    def decode(self, ids) -> str:
        """The text of a sequence of character ids."""
        return "".join(self.chars[int(i)] for i in ids)

    def split(self, name: str) -> Tensor:
        """The encoded ``"train"`` or ``"val"`` split; ValueError for another name."""
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val

    def batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
              rows: slice | None = None) -> tuple[Tensor, Tensor]:
        """``batch_size`` windows of ``block_size`` characters at offsets drawn from ``generator``.

        ``generator`` is a CPU generator: the same seed gives the same batches on any device;
        targets are the inputs shifted by one. ``rows``: only those windows of the batch (a
        process's share), the generator moved on as for the whole batch.
        """
        data = self.split(split)
        high = len(data) - block_size - 1
        if high < 1:
            raise ValueError(f"the {split} split ({len(data)} characters) is shorter than block_size + 1")
        offsets = torch.randint(0, high, (batch_size,), generator=generator)[rows or slice(None)].to(data.device)
        idx = offsets[:, None] + torch.arange(block_size + 1, device=data.device)
        chunk = data[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def fixed_batches(self, split: str, n: int, batch_size: int, block_size: int, seed: int,
                      rows: slice | None = None) -> list[tuple[Tensor, Tensor]]:
        """``n`` batches drawn once from ``seed``: the evaluation set every optimizer is scored on (``rows``: as `batch`)."""
        gen = torch.Generator().manual_seed(seed)
        return [self.batch(split, batch_size, block_size, gen, rows) for _ in range(n)]


#: the file of each split in a token directory (nanoGPT's ``data/<corpus>/prepare.py`` writes them)
TOKEN_FILES = {"train": "train.bin", "val": "val.bin"}


class TokenDataset:
    """A tokenized corpus as nanoGPT stores it: one flat file of ``uint16`` token ids per split.

    ``DIR/train.bin`` and ``DIR/val.bin`` are memory-mapped, not read: a batch reads its
    windows only. Offsets are drawn as `CharDataset.batch` draws them, so the same generator
    gives the same windows of the same ids.
    """

    def __init__(self, directory: str | Path, vocab_size: int, device: str | torch.device = "cpu") -> None:
        directory = Path(directory).expanduser()
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.splits = {name: np.memmap(directory / f, dtype=np.uint16, mode="r") for name, f in TOKEN_FILES.items()}

    def check_vocabulary(self, chunk: int = 1 << 24) -> None:
        """Read every token once: each must be below ``vocab_size``.

        Raises:
            ValueError: naming the split, the largest id and the vocabulary size.
        """
        for name, data in self.splits.items():
            top = max((int(data[i:i + chunk].max()) for i in range(0, len(data), chunk)), default=-1)
            if top >= self.vocab_size:
                raise ValueError(f"{TOKEN_FILES[name]} holds token id {top}, not below the vocabulary size "
                                 f"{self.vocab_size} (data.vocab_size)")

    def split(self, name: str) -> np.memmap:
        """The ``"train"`` or ``"val"`` split's token ids; ValueError for another name."""
        if name not in self.splits:
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.splits[name]

    def batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
              rows: slice | None = None) -> tuple[Tensor, Tensor]:
        """``batch_size`` windows of ``block_size`` tokens at offsets drawn from ``generator`` (a CPU generator).

        ``rows``: only those windows are read (a process's share), the generator moved on as for
        the whole batch.
        """
        data = self.split(split)
        high = len(data) - block_size - 1
        if high < 1:
            raise ValueError(f"the {split} split ({len(data)} tokens) is shorter than block_size + 1")
        offsets = torch.randint(0, high, (batch_size,), generator=generator)[rows or slice(None)].tolist()
        chunk = torch.from_numpy(np.stack([data[o:o + block_size + 1].astype(np.int64) for o in offsets])).to(self.device)
        return chunk[:, :-1], chunk[:, 1:]

    def fixed_batches(self, split: str, n: int, batch_size: int, block_size: int, seed: int,
                      rows: slice | None = None) -> list[tuple[Tensor, Tensor]]:
        """``n`` batches drawn once from ``seed``: the evaluation set every optimizer is scored on (``rows``: as `batch`)."""
        gen = torch.Generator().manual_seed(seed)
        return [self.batch(split, batch_size, block_size, gen, rows) for _ in range(n)]


def load_dataset(data_cfg, device: str | torch.device = "cpu", *, check: bool = True) -> CharDataset | TokenDataset:
    """The data a job's ``data:`` names: token files (``tokens:``), else a text.

    ``check``: read every token once against ``vocab_size`` (one process of several does it).
    """
    if data_cfg.tokens is not None:
        data = TokenDataset(data_cfg.tokens, data_cfg.vocab_size, device)
        if check:
            data.check_vocabulary()
        return data
    return CharDataset.from_source(data_cfg.path, data_cfg.val_fraction, device)
