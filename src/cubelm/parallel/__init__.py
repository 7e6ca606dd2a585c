"""Parallelism applied to a built model from outside (torchtitan style): the model never branches on it.

    config.py           ParallelConfig: dp degree + mode (ddp | fsdp), tp, pp, schedule, micro-batches, virtual stages
    mesh.py             init the process group (gloo on CPU, nccl on CUDA, collective timeout) and the one
                        DeviceMesh with dims ("pp", "dp", "tp")
    data_parallel.py    apply_ddp, apply_fsdp (FSDP2 fully_shard, mixed precision where the backend allows it)
    tensor_parallel.py  apply_tp (column/row parallel + sequence parallel norms), the ch. 14 linear example
    pipeline.py         balanced stage split (looped or V-shaped), stage modules, the seven torch schedules
    pipeline_timing.py  measure a real 2-stage run: each rank's busy / idle time (for the schedule simulator)
    checkpoint.py       DCP sharded save / load (any world size) and a rank-0 full-state HF export
    trainer.py          ParallelTrainer: the single-process Trainer with the parallel pieces plugged in
    launch.py           ``cubelm train --nproc N``: relaunch under torchrun (one machine), fail fast naming a rank

    cubelm train --data DIR --out RUN --nproc 2 --dp-mode fsdp
    cubelm train --data DIR --out RUN --nproc 4 --dp 2 --tp 2
    torchrun --nproc-per-node 2 -m cubelm train --data DIR --out RUN --pp 2 --schedule interleaved-1f1b
"""

from cubelm.parallel.config import SCHEDULES, ParallelConfig

__all__ = ["ParallelConfig", "SCHEDULES"]
