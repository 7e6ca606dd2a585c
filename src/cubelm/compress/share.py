"""Cross-layer parameter sharing (ALBERT-style) and tied embeddings: ``cubelm compress share``.

    cubelm compress share --model DIR --out OUT --groups 2            # 2 weight sets for all decoder layers
    cubelm compress share --model DIR --out OUT --every 2             # layers (0,1), (2,3), ... share a set
    cubelm compress share --model DIR --out OUT --tie-embeddings      # output head := input embedding

Consecutive decoder layers form groups (``--groups G``: G groups of L/G layers, the first groups one layer
longer when G does not divide L; ``--every N``: N layers per group); every layer of a group runs the same norm,
attention-projection and MLP modules, so the group's weights are stored once. The set starts as its FIRST layer's
weights (``--init first``, the default: the group's later layers are dropped and the first one runs in their
place) or as the element-wise MEAN of the group's layers (``--init mean``). Without retraining, the first is far
better: layers of a trained model are not aligned (each one's neurons and heads are in its own order), so an
average mixes unrelated directions. Measured on the default model (tiny, 4 layers; held-out bits per byte 2.019):
``--groups 2`` 2.338 with ``first``, 3.328 with ``mean`` (worse than the unigram baseline, 3.00). ALBERT trains
the shared weights from the start; ``cubelm finetune`` on the shared directory trains them from here (the shared
modules get the gradients of every layer that runs them).

``--tie-embeddings`` makes the output head the transpose of the input embedding (HF's
``tie_word_embeddings``): the embedding matrix is kept and the head's is dropped.

Each layer keeps its own attention module (its ``layer_idx``), so the KV cache stays per layer: sharing saves
weight memory and bytes on disk, not KV memory nor compute. Saved with cubelm's ``cubelm_shared_layers``
extension of config.json (``cubelm.compress.architecture``), which ``load_model`` / ``LLM`` rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cubelm.cli import opt
from cubelm.compress.architecture import first_layers, shared_groups, tie_shared_layers
from cubelm.errors import CubelmError

INITS = ("mean", "first")


def layer_groups(num_layers: int, *, groups: int | None = None, every: int | None = None) -> list[int]:
    """The weight-set index of each layer: consecutive layers, ``groups`` sets or ``every`` layers per set."""
    if (groups is None) == (every is None):
        raise CubelmError("give one of --groups (number of weight sets) or --every (layers per set)")
    if groups is not None:
        if not 1 <= groups <= num_layers:
            raise CubelmError(f"--groups must be in [1, {num_layers}] (the model has {num_layers} decoder layers), "
                              f"got {groups}")
        base, extra = divmod(num_layers, groups)  # the first `extra` groups get one more layer
        sizes = [base + (g < extra) for g in range(groups)]
        return [g for g, size in enumerate(sizes) for _ in range(size)]
    if not 1 <= every <= num_layers:
        raise CubelmError(f"--every must be in [1, {num_layers}] (the model has {num_layers} decoder layers), "
                          f"got {every}")
    return [i // every for i in range(num_layers)]


@torch.no_grad()
def apply_sharing(model: nn.Module, groups: list[int], init: str = "first") -> nn.Module:
    """Make the layers of each group share one set of weights, in place (``init``: first or mean)."""
    if init not in INITS:
        raise CubelmError(f"unknown --init {init!r}; choose one of {', '.join(INITS)}")
    if shared_groups(model) is not None:
        raise CubelmError("the model already shares layers; share its unshared source")
    layers = model.model.layers
    if init == "mean":
        for kind in {type(m).__name__ for layer in layers for m in layer.modules() if hasattr(m, "in_features")}:
            if kind != "Linear":
                raise CubelmError(f"--init mean averages dense weights, but the layers hold {kind} projections; "
                                  f"use --init first or share the dense model")
        owners = first_layers(groups)
        for g in sorted(set(groups)):
            members = [layers[i] for i, gi in enumerate(groups) if gi == g]
            dst = layers[owners[groups.index(g)]].state_dict(keep_vars=True)
            states = [m.state_dict() for m in members]
            for key, param in dst.items():
                param.copy_(torch.stack([s[key].float() for s in states]).mean(0).to(param.dtype))
    tie_shared_layers(model, groups)
    return model


def tie_embeddings(model: nn.Module) -> nn.Module:
    """The output head becomes the input embedding (the embedding's values are kept)."""
    model.config = model.config.replace(tie_word_embeddings=True)
    model.tie_weights()
    return model


@dataclass(slots=True, kw_only=True)
class ShareOptions:
    model: str | None = opt(None, help="model directory (HF format); default: the default model")
    out: str = opt(help="output directory (created; files of the same name are replaced)", metavar="DIR")
    groups: int | None = opt(None, help="number of weight sets: consecutive layers in that many groups")
    every: int | None = opt(None, help="layers per weight set (consecutive)")
    init: str = opt("first", help="a set's weights: its first layer's, or the mean of its layers (much worse "
                               "without retraining)", choices=INITS)
    tie_embeddings: bool = opt(False, help="also tie the output head to the input embedding (keeps the embedding)")

    def __post_init__(self) -> None:
        if self.groups is None and self.every is None and not self.tie_embeddings:
            raise CubelmError("nothing to share: give --groups, --every and/or --tie-embeddings")
        if self.groups is not None and self.every is not None:
            raise CubelmError("give one of --groups (number of weight sets) or --every (layers per set), not both")


def run_share(o: ShareOptions) -> int:
    from cubelm.compress.architecture import load_float_model, save_compressed, weights_bytes
    from cubelm.engine.commands import resolve_model_dir
    src = resolve_model_dir(o.model)
    model = load_float_model(src)
    n = model.config.num_hidden_layers
    groups = None
    if o.groups is not None or o.every is not None:
        groups = layer_groups(n, groups=o.groups, every=o.every)
        apply_sharing(model, groups, o.init)
    if o.tie_embeddings:
        if model.config.tie_word_embeddings:
            raise CubelmError(f"{src} already ties its embeddings; drop --tie-embeddings")
        tie_embeddings(model)
    out = save_compressed(model, src, o.out)
    if groups is not None:
        print(f"[cubelm] {n} decoder layers -> {len(set(groups))} weight sets {groups} (init: {o.init})")
    if o.tie_embeddings:
        print("[cubelm] output head tied to the input embedding")
    print(f"[cubelm] {src} -> {out}: weights {weights_bytes(src) / 2**20:.2f} -> {weights_bytes(out) / 2**20:.2f} MiB")
    return 0
