"""Padding a batch of token-id sequences into the tensors a model takes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)``, both ``(len(seqs), longest)`` long tensors on
    the CPU: each sequence padded with ``pad_id`` on the right (scoring, training) or
    on the left (generation, so that every row's last token is real)."""
    if side not in ("right", "left"):
        raise ValueError(f"pad_batch: side must be 'right' or 'left', got {side!r}")
    if not seqs:
        raise ValueError("pad_batch: no sequences")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        n = len(seq)
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask
