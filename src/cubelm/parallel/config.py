"""``ParallelConfig``: how a job is laid out on ``world = pp × dp × tp`` ranks.

``micro_batch_size`` in ``TrainConfig`` stays the *global* number of sequences per micro-step: data-parallel ranks
split it (each reads ``micro_batch_size / dp`` distinct sequences), so a run gives the same losses whatever the
layout, and a checkpoint resumes on another world size with the same training config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cubelm.errors import CubelmError

# cubelm name -> torch.distributed.pipelining class name
SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved-1f1b": "ScheduleInterleaved1F1B",
    "looped-bfs": "ScheduleLoopedBFS",
    "interleaved-zb": "ScheduleInterleavedZeroBubble",
    "zbv": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
}
SINGLE_STAGE = ("gpipe", "1f1b")  # one stage per rank
V_SHAPED = ("zbv", "dualpipev")  # two stages per rank, rank r holds stages r and 2·pp − 1 − r
DP_MODES = ("ddp", "fsdp")


@dataclass(slots=True, kw_only=True)
class ParallelConfig:
    dp: int | None = None  # None: whatever is left of the world after tp and pp
    dp_mode: str = "fsdp"
    tp: int = 1
    pp: int = 1
    schedule: str = "1f1b"
    microbatches: int | None = None  # pipeline micro-batches per micro-step; None: 2 × pp
    virtual_stages: int | None = None  # stages per pipeline rank; None: 1 for gpipe/1f1b, else 2
    sequence_parallel: bool = True  # shard the norms' activations along the sequence (needs tp > 1)
    timeout_s: float = 300.0  # collective timeout: a rank that stops answering fails the job after this

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            _check_degree(name, getattr(self, name))
        if self.dp is not None:
            _check_degree("dp", self.dp)
        if self.dp_mode not in DP_MODES:
            raise CubelmError(f"--dp-mode must be ddp or fsdp, got {self.dp_mode!r}")
        if self.schedule not in SCHEDULES:
            raise CubelmError(f"unknown pipeline schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.virtual_stages is None:
            self.virtual_stages = 1 if self.schedule in SINGLE_STAGE else 2
        if self.microbatches is None:
            self.microbatches = 2 * self.pp
        _check_degree("microbatches", self.microbatches)
        _check_degree("virtual_stages", self.virtual_stages)
        if self.schedule in SINGLE_STAGE and self.virtual_stages != 1:
            raise CubelmError(f"schedule {self.schedule} runs one stage per rank; drop --virtual-stages or pick "
                              f"interleaved-1f1b, looped-bfs, interleaved-zb, zbv or dualpipev")
        if self.schedule in V_SHAPED and self.virtual_stages != 2:
            raise CubelmError(f"schedule {self.schedule} places exactly 2 stages per rank (V shape); "
                              f"use --virtual-stages 2")
        if self.dp_mode == "ddp" and self.tp > 1:
            raise CubelmError("DDP does not compose with tensor parallel here (DTensor parameters); "
                              "use --dp-mode fsdp with --tp")
        if self.dp_mode == "ddp" and self.pp > 1 and (self.dp or 0) > 1:
            # DDP's reducer asserts when a pipeline runs several micro-batch forwards before their backwards
            raise CubelmError("DDP does not compose with pipeline parallel here; use --dp-mode fsdp with --pp")
        if self.timeout_s <= 0:
            raise CubelmError(f"--dist-timeout must be positive seconds, got {self.timeout_s}")

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages

    def resolved(self, world_size: int) -> "ParallelConfig":
        """A copy with ``dp`` filled in; raises if ``pp × dp × tp`` does not equal the world size."""
        rest, rem = divmod(world_size, self.tp * self.pp)
        dp = self.dp if self.dp is not None else rest
        if rem or dp * self.tp * self.pp != world_size:
            raise CubelmError(f"{world_size} processes cannot hold pp {self.pp} × dp {self.dp or '?'} × tp {self.tp}; "
                              f"launch pp·dp·tp processes (--nproc) or change the degrees")
        return dataclasses.replace(self, dp=dp)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_degree(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CubelmError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
