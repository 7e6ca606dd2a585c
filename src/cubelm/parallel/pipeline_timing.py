"""Measured timelines of a real pipeline: what the schedule simulator's predictions are compared with.

Runs a small model split into 2 pipeline stages (one per rank) under one of the torch schedules and times every
compute action — each micro-batch's forward, backward (input grads) and, for zero-bubble schedules, weight-grad
backward — by wrapping the stage's ``forward_one_chunk`` / ``backward_one_chunk`` / ``backward_weight_one_chunk``.
Everything else in a step (waiting on receives, sends, the loss) counts as idle. Must run on 2 ranks:

    torchrun --standalone --nproc-per-node 2 -m cubelm.parallel.pipeline_timing --schedule 1f1b --microbatches 4

or, from Python inside such a job, ``measure_pipeline(schedule="gpipe", microbatches=4)``: every rank gets the
same ``PipelineTiming`` (per-rank busy / idle seconds, mean F and B per micro-batch, the last step's events).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist


@dataclass(slots=True)
class RankTiming:
    rank: int
    step_s: float  # wall time of one schedule step (mean over measured steps)
    busy_s: float  # time inside compute actions
    idle_s: float  # step_s - busy_s: bubbles, waiting on p2p
    forward_s: float  # mean forward per micro-batch (per stage on this rank)
    backward_s: float  # mean backward (input grads, or full backward if not split) per micro-batch
    backward_weight_s: float  # mean weight-grad backward per micro-batch (zero-bubble schedules), else 0
    events: list = field(default_factory=list)  # last step: [kind "F"|"B"|"W", stage, microbatch, start, end] (s)


@dataclass(slots=True)
class PipelineTiming:
    schedule: str
    stages: int
    microbatches: int
    ranks: list[RankTiming]

    @property
    def idle_fraction(self) -> float:
        """Mean over ranks of idle / step time: the measured bubble fraction."""
        return sum(r.idle_s / r.step_s for r in self.ranks) / len(self.ranks)

    def to_dict(self) -> dict:
        return {**asdict(self), "idle_fraction": self.idle_fraction}


def _timed(fn, kind: str, stage: int, log: list, t0: list):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        end = time.perf_counter()
        chunk = args[0] if args and isinstance(args[0], int) else -1  # the micro-batch id comes first
        log.append([kind, stage, chunk, start - t0[0], end - t0[0]])
        return out

    return wrapper


def measure_pipeline(schedule: str = "1f1b", microbatches: int = 4, *, hidden_size: int = 128,
                     num_layers: int = 4, seq_len: int = 64, batch_size: int = 8, steps: int = 3,
                     warmup: int = 1) -> PipelineTiming:
    """Collective over a 2-rank job (initializes gloo if needed). Single-stage schedules only (gpipe, 1f1b):
    the simulator's 2-stage comparison needs one stage per device."""
    from cubelm.model.config import ModelConfig
    from cubelm.model.transformer import build_model
    from cubelm.parallel.config import ParallelConfig
    from cubelm.parallel.pipeline import build_schedule, split_model
    from cubelm.parallel.trainer import PipelineLoss
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    pc = ParallelConfig(pp=world, schedule=schedule, microbatches=microbatches)
    cfg = ModelConfig(vocab_size=512, hidden_size=hidden_size, intermediate_size=hidden_size * 4,
                      num_hidden_layers=num_layers, num_attention_heads=4, max_position_embeddings=seq_len)
    stages = split_model(build_model(cfg, seed=0), pc, rank)
    sched = build_schedule(pc, stages, [s for s in range(pc.num_stages) if s % world == rank], None,
                           torch.device("cpu"), PipelineLoss())
    log: list = []
    t0 = [0.0]
    inner = sched._stages if hasattr(sched, "_stages") else [sched._stage]
    for st in inner:
        st.forward_one_chunk = _timed(st.forward_one_chunk, "F", st.stage_index, log, t0)
        st.backward_one_chunk = _timed(st.backward_one_chunk, "B", st.stage_index, log, t0)
        if hasattr(st, "backward_weight_one_chunk"):
            st.backward_weight_one_chunk = _timed(st.backward_weight_one_chunk, "W", st.stage_index, log, t0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen)
    step_times, busy, per_kind = [], [], {"F": [], "B": [], "W": []}
    for i in range(warmup + steps):
        log.clear()
        dist.barrier()
        t0[0] = time.perf_counter()
        sched.step(*((x,) if rank == 0 else ()), **({"target": y, "losses": []} if rank == world - 1 else {}))
        elapsed = time.perf_counter() - t0[0]
        for p in (p for s in stages for p in s.parameters()):
            p.grad = None
        if i >= warmup:
            step_times.append(elapsed)
            busy.append(sum(e[4] - e[3] for e in log))
            for e in log:
                per_kind[e[0]].append(e[4] - e[3])
    mean = lambda v: sum(v) / len(v) if v else 0.0  # noqa: E731
    mine = RankTiming(rank=rank, step_s=mean(step_times), busy_s=mean(busy), idle_s=mean(step_times) - mean(busy),
                      forward_s=mean(per_kind["F"]), backward_s=mean(per_kind["B"]),
                      backward_weight_s=mean(per_kind["W"]), events=[list(e) for e in log])
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    return PipelineTiming(schedule=schedule, stages=pc.num_stages, microbatches=microbatches, ranks=everyone)


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="Measure per-rank busy/idle time of a real 2-stage pipeline step.")
    p.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b"])
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", default=None, help="write the result here (rank 0)")
    a = p.parse_args(argv)
    t = measure_pipeline(a.schedule, a.microbatches, hidden_size=a.hidden_size, steps=a.steps)
    if dist.get_rank() == 0:
        text = json.dumps(t.to_dict(), indent=2)
        if a.json:
            open(a.json, "w").write(text)
        print(text if not a.json else f"idle fraction {t.idle_fraction:.3f}; wrote {a.json}")
    return 0


if __name__ == "__main__":
    from cubelm.parallel.mesh import exit_rank
    exit_rank(main())
