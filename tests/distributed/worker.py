"""Runs many distributed checks in one torchrun launch (a launch costs 10-20 s; the checks take well under 1 s each).

    torchrun --nproc-per-node 2 tests/distributed/worker.py TASKS.json RESULTS.jsonl

TASKS.json is a list of {"name", "kind", ...}; rank 0 appends one JSON line per finished task to RESULTS.jsonl,
so a failure late in the list still leaves the earlier results. Kinds:

    train    {"parallel": ParallelConfig fields, "train": TrainConfig fields, "data", "out", "steps",
              "resume": bool, "save": bool, "export": bool}  -> {"losses": [...]}
    ch14     the book's ch. 14 linear example, column- and row-parallel on the tp ranks
    timing   cubelm.parallel.pipeline_timing.measure_pipeline on 2 stages -> per-rank busy / idle seconds
    finetune {"parallel", "train", "finetune": FinetuneConfig fields, "lora": LoraConfig fields, "out", "steps",
              "resume", "save", "export"}  -> {"losses": [...]} (cubelm.finetune.trainer.ParallelFinetuneTrainer)
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import torch
import torch.distributed as dist

from cubelm.parallel.mesh import exit_rank


def run_train(task: dict) -> dict:
    from cubelm.parallel.config import ParallelConfig
    from cubelm.parallel.trainer import ParallelTrainer
    from cubelm.train.config import TrainConfig
    trainer = ParallelTrainer(TrainConfig(**task["train"]), ParallelConfig(**task["parallel"]), task["data"],
                              task["out"], resume=task.get("resume", False), log=lambda m: None)
    trainer.model.train()
    losses = [trainer.train_step()["loss"] for _ in range(task["steps"])]
    out = {"losses": losses, "step": trainer.state.step}
    if task.get("save"):
        out["checkpoint"] = str(trainer.save())
    if task.get("export"):
        out["export"] = str(trainer.export())
    if task.get("evaluate"):
        out["eval"] = trainer.evaluate()
    return out


def run_finetune(task: dict) -> dict:
    from cubelm.finetune.config import LoraConfig
    from cubelm.finetune.recipe import FinetuneConfig, finetune_train_config
    from cubelm.finetune.trainer import ParallelFinetuneTrainer
    from cubelm.parallel.config import ParallelConfig
    ft = FinetuneConfig(**task["finetune"], lora=LoraConfig(**task.get("lora", {})))
    trainer = ParallelFinetuneTrainer(finetune_train_config(ft.method, **task["train"]), ft,
                                      ParallelConfig(**task["parallel"]), task["out"], resume=task.get("resume", False),
                                      log=lambda m: None)
    trainer.model.train()
    losses = [trainer.train_step()["loss"] for _ in range(task["steps"])]
    out = {"losses": losses, "step": trainer.state.step, "trainable": trainer.num_trainable}
    if task.get("save"):
        out["checkpoint"] = str(trainer.save())
    if task.get("export"):
        out["export"] = str(trainer.export())
    return out


def run_ch14(task: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from cubelm.parallel.tensor_parallel import column_parallel_linear, row_parallel_linear
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    W = torch.tensor([[1, 2, 5, 6], [3, 4, 7, 8], [2, 0, 3, 1], [-1, 4, 8, 2]], dtype=torch.float32)  # (in, out)
    x = torch.tensor([[1, 2, 0, 1]], dtype=torch.float32)
    out = {}
    for kind, fn in (("column", column_parallel_linear), ("row", row_parallel_linear)):
        lin = torch.nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            lin.weight.copy_(W.T)  # nn.Linear computes x @ weight.T, so weight = W^T gives y = x·W
        fn(lin, mesh)
        local_w = lin.weight.to_local()  # this rank's slice of W^T
        r, n = mesh.get_local_rank(), 4 // mesh.size()
        if kind == "column":  # rows of W^T = columns of W; no communication until the gather
            x_in = x
        else:  # columns of W^T = rows of W, times the matching slice of x: a partial sum of the full y
            x_in = x[:, r * n:(r + 1) * n]
        partial = x_in @ local_w.T
        y = lin(x_in)
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, partial.flatten().tolist())
        out[kind] = {"y": y.flatten().tolist(), "local": parts}
    return out


def run_timing(task: dict) -> dict:
    from cubelm.parallel.pipeline_timing import measure_pipeline
    return measure_pipeline(**task.get("args", {})).to_dict()


KINDS = {"train": run_train, "ch14": run_ch14, "timing": run_timing, "finetune": run_finetune}


def main(tasks_path: str, results_path: str) -> None:
    dist.init_process_group("gloo")
    tasks = json.load(open(tasks_path))
    for task in tasks:
        t0 = time.perf_counter()
        try:
            result = KINDS[task["kind"]](task)
        except Exception:  # recorded, then re-raised: a rank out of step with the others cannot go on
            if dist.get_rank() == 0:
                _append(results_path, {"name": task["name"], "error": traceback.format_exc()})
            raise
        dist.barrier()
        if dist.get_rank() == 0:
            _append(results_path, {"name": task["name"], "seconds": time.perf_counter() - t0, **result})
    exit_rank(0)  # not a plain return: see its docstring (a finalizing interpreter can abort a finished rank)


def _append(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
