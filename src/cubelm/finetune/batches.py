"""Batches of whole instruct examples, padded per micro-batch: ``cubelm train``'s sampler contract for fine-tuning.

Why padding and not packing: ``cubelm train`` packs documents into fixed windows, which cuts an example wherever
a window ends (an answer can lose its prompt) and lets an example attend to the unrelated ones before it, at
positions that do not start at 0. For instruct tuning each example is trained exactly as it is prompted later:
alone, from position 0, whole. Examples in a micro-batch are right-padded to the longest one (the pad positions
are after every real token, so causal attention never lets a real token see them, and their targets are ignored);
the cost is the padding's compute, which only the longest example of each batch sets.

Exact resume, as ``WindowSampler``: global sample ``i`` is example ``perm_e[i % n]`` with ``e = i // n`` and
``perm_e`` drawn from ``seed + e``, so the batches are a pure function of the sample counter; a data-parallel rank
takes every ``world``-th sample of each global batch. The validation sampler (``wrap=False``) visits each example
once: samples past the end are empty rows with no target, so an evaluation over ``ceil(n / batch)`` batches counts
every validation token exactly once.
"""

from __future__ import annotations

import numpy as np
import torch

from cubelm.errors import CubelmError
from cubelm.finetune.render import Example
from cubelm.train.batches import IGNORE_INDEX


class ExampleSampler:
    def __init__(self, examples: list[Example], *, pad_id: int, seed: int = 0, shuffle: bool = True,
                 wrap: bool = True):
        if not examples:
            raise CubelmError("no examples to sample from")
        self.examples, self.pad_id, self.seed, self.shuffle, self.wrap = examples, pad_id, seed, shuffle, wrap
        self.mask = [e.mask for e in examples]  # loss-masked data: ParallelTrainer weights ranks by target tokens
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def index(self, sample: int) -> int | None:
        """The example of global sample ``sample``; None past the end of a sampler that does not wrap."""
        epoch, i = divmod(sample, len(self.examples))
        if epoch and not self.wrap:
            return None
        if not self.shuffle:
            return i
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng(self.seed + epoch).permutation(len(self.examples)))
        return int(self._perm[1][i])

    def batch(self, first_sample: int, batch_size: int, *, rank: int = 0, world: int = 1,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``first_sample + j * world + rank`` for ``j < batch_size`` → x, y of shape (batch_size, T),
        T = the longest example's length - 1."""
        rows = [self._row(self.index(first_sample + j * world + rank)) for j in range(batch_size)]
        T = max(len(x) for x, _ in rows)
        x = np.full((batch_size, T), self.pad_id, dtype=np.int64)
        y = np.full((batch_size, T), IGNORE_INDEX, dtype=np.int64)
        for j, (xs, ys) in enumerate(rows):
            x[j, :len(xs)], y[j, :len(ys)] = xs, ys
        return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

    def _row(self, index: int | None) -> tuple[np.ndarray, np.ndarray]:
        if index is None:
            return np.array([self.pad_id]), np.array([IGNORE_INDEX])
        ex = self.examples[index]
        target = ex.ids[1:].copy()
        target[ex.mask[1:] == 0] = IGNORE_INDEX
        return ex.ids[:-1], target

    def num_tokens(self, first_sample: int, end_sample: int) -> int:
        """Input tokens (without padding) of global samples [first_sample, end_sample)."""
        indices = (self.index(s) for s in range(first_sample, end_sample))
        return sum(len(self.examples[i].ids) - 1 for i in indices if i is not None)
