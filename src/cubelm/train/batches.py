"""Deterministic training batches from a flat token array: exact resume needs only a sample counter.

Window ``w`` covers tokens ``[w * T, w * T + T + 1)``. Epoch ``e`` visits all windows in the permutation drawn
from ``seed + e``; global sample ``i`` is window ``perm_e[i % n]`` with ``e = i // n``. A data-parallel rank takes
every ``world``-th sample, so ranks read disjoint parts of each global batch (DistributedSampler semantics).
"""

from __future__ import annotations

import numpy as np
import torch

from cubelm.errors import CubelmError

IGNORE_INDEX = -100


class WindowSampler:
    def __init__(self, tokens: np.ndarray, seq_len: int, *, mask: np.ndarray | None = None, seed: int = 0,
                 shuffle: bool = True):
        self.tokens, self.mask, self.seq_len, self.seed, self.shuffle = tokens, mask, seq_len, seed, shuffle
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise CubelmError(f"only {len(tokens)} tokens: not even one window of seq_len {seq_len} + 1; "
                              f"use more data or a shorter --seq-len")
        self._perm: tuple[int, np.ndarray] | None = None

    def window(self, sample: int) -> int:
        epoch, i = divmod(sample, self.num_windows)
        if not self.shuffle:
            return i
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng(self.seed + epoch).permutation(self.num_windows))
        return int(self._perm[1][i])

    def batch(self, first_sample: int, batch_size: int, *, rank: int = 0, world: int = 1,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Samples first_sample + (j * world + rank) for j < batch_size -> x, y of shape (batch_size, seq_len)."""
        T = self.seq_len
        xs, ys = [], []
        for j in range(batch_size):
            start = self.window(first_sample + j * world + rank) * T
            chunk = np.asarray(self.tokens[start:start + T + 1], dtype=np.int64)
            target = chunk[1:].copy()
            if self.mask is not None:  # loss only where the target token is marked (e.g. instruct responses)
                target[np.asarray(self.mask[start + 1:start + T + 1]) == 0] = IGNORE_INDEX
            xs.append(chunk[:-1])
            ys.append(target)
        x = torch.from_numpy(np.stack(xs)).to(device)
        y = torch.from_numpy(np.stack(ys)).to(device)
        return x, y
