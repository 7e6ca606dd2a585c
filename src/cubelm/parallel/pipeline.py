"""Pipeline parallelism with ``torch.distributed.pipelining``: stage split, stage modules, schedules.

The model's ``num_hidden_layers`` are cut into ``pp × virtual_stages`` contiguous stages whose layer counts differ
by at most one; stage 0 also holds the embeddings, the last stage the final norm and ``lm_head``. Stages are
placed on pipeline ranks

* looped (GPipe, 1F1B, interleaved 1F1B, looped BFS, interleaved zero bubble): rank r holds r, r + pp, r + 2pp, …
* V-shaped (ZBV, DualPipeV): rank r holds r and 2·pp − 1 − r, so the first and last stage share rank 0.

A stage module keeps Hugging Face parameter names (``model.layers.5.mlp.up_proj.weight``), so optimizer state,
DCP checkpoints and the HF export need no mapping, and a checkpoint reshards onto any other stage layout.
"""

from __future__ import annotations

from torch import nn

from cubelm.errors import CubelmError
from cubelm.model.attention import CausalAttention
from cubelm.model.transformer import CausalLM
from cubelm.parallel.config import SCHEDULES, SINGLE_STAGE, V_SHAPED, ParallelConfig


def stage_layer_ranges(num_layers: int, num_stages: int) -> list[range]:
    """Balanced contiguous split: the first ``num_layers % num_stages`` stages get one extra layer."""
    if num_layers < num_stages:
        raise CubelmError(f"{num_layers} layers cannot fill {num_stages} pipeline stages (pp × virtual stages); "
                          f"lower --pp or --virtual-stages")
    base, extra = divmod(num_layers, num_stages)
    out, start = [], 0
    for s in range(num_stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def stages_of_rank(pp_rank: int, pc: ParallelConfig) -> list[int]:
    if pc.schedule in V_SHAPED:
        return [pp_rank, 2 * pc.pp - 1 - pp_rank]
    return [pp_rank + k * pc.pp for k in range(pc.virtual_stages)]


class PipelineStageModule(nn.Module):
    """One stage: optional embeddings, some decoder layers, optional norm + head. It owns no new parameters:
    its submodules are the built model's own (same objects, same names)."""

    def __init__(self, model: CausalLM, layer_ids: range, *, first: bool, last: bool):
        super().__init__()
        self.config, self.first, self.last = model.config, first, last
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in layer_ids})
        self.model.rotary_emb = model.model.rotary_emb
        self.model.embed_tokens = model.model.embed_tokens if first else None
        self.model.norm = model.model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.attn = CausalAttention(model.config.sliding_window)

    def forward(self, x):
        # x: token ids (B, T) on the first stage, hidden states (B, T, hidden) after it
        if self.first:
            x = self.model.embed_tokens(x)
        positions = _positions(x)
        cos, sin = self.model.rotary_emb(positions, x.dtype)
        for layer in self.model.layers.values():
            x = layer(x, cos, sin, self.attn)
        if self.last:
            x = self.lm_head(self.model.norm(x))
        return x


def _positions(x):
    import torch
    B, T = x.shape[0], x.shape[1]
    return torch.arange(T, device=x.device).expand(B, T)


def local_container(model: CausalLM, stages: list[PipelineStageModule]) -> nn.Module:
    """What this rank holds, as one module with HF names: the optimizer's and the checkpoint's view."""
    root = nn.Module()
    root.config = model.config
    root.model = nn.Module()
    root.model.layers = nn.ModuleDict({k: v for s in stages for k, v in s.model.layers.items()})
    for s in stages:
        if s.first:
            root.model.embed_tokens = s.model.embed_tokens
        if s.last:
            root.model.norm, root.lm_head = s.model.norm, s.lm_head
    return root


def split_model(model: CausalLM, pc: ParallelConfig, pp_rank: int) -> list[PipelineStageModule]:
    if model.config.tie_word_embeddings and pc.pp > 1:
        raise CubelmError("pipeline parallel needs untied embeddings (embed_tokens and lm_head live on different "
                          "stages); use a preset with tie_word_embeddings false")
    ranges = stage_layer_ranges(model.config.num_hidden_layers, pc.num_stages)
    return [PipelineStageModule(model, ranges[s], first=s == 0, last=s == pc.num_stages - 1)
            for s in stages_of_rank(pp_rank, pc)]


def build_schedule(pc: ParallelConfig, stage_modules: list[nn.Module], stage_ids: list[int], pp_group, device,
                   loss_fn):
    """PipelineStage objects + the named schedule. ``stage_modules`` may be wrapped (DDP) or sharded (FSDP)."""
    import torch.distributed.pipelining as pipelining
    stages = [pipelining.PipelineStage(m, s, pc.num_stages, device, group=pp_group)
              for m, s in zip(stage_modules, stage_ids)]
    cls = getattr(pipelining, SCHEDULES[pc.schedule])
    if pc.schedule in SINGLE_STAGE:
        return cls(stages[0], n_microbatches=pc.microbatches, loss_fn=loss_fn)
    return cls(stages, n_microbatches=pc.microbatches, loss_fn=loss_fn)
