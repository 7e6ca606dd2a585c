"""``cubelm pipeline simulate``: options and run function (light: the simulator is pure Python, matplotlib loads only
for ``--png``).

    cubelm pipeline simulate --stages 4 --microbatches 8 --schedule 1f1b
    cubelm pipeline simulate --stages 4 --microbatches 8 --schedule interleaved-1f1b --virtual-stages 2 --png t.png
    cubelm pipeline simulate --stages 8 --microbatches 32 --schedule dualpipe --backward-weight-cost 0.5 --json
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cubelm.cli import opt
from cubelm.errors import CubelmError
from cubelm.systems.pipeline_schedules import SCHEDULES
from cubelm.systems.pipeline_sim import Costs, check_inputs, plot_timeline, simulate


@dataclass(slots=True, kw_only=True)
class SimulateOptions:
    stages: int = opt(help="pipeline devices p")
    microbatches: int = opt(help="micro-batches m per step")
    schedule: str = opt(choices=SCHEDULES, help="pipeline schedule")
    virtual_stages: int | None = opt(None, metavar="V",
                                     help="model chunks per device for interleaved-1f1b (default 2); zbv, dualpipe "
                                          "and dualpipev always use 2, the others 1")
    forward_cost: float = opt(1.0, metavar="F", help="forward time of one micro-batch through a device's layers")
    backward_input_cost: float = opt(1.0, metavar="B", help="backward-for-inputs time (the critical-path half)")
    backward_weight_cost: float = opt(1.0, metavar="W", help="backward-for-weights time (schedules that do not "
                                                             "split the backward run B+W as one op)")
    overlap_cost: float | None = opt(None, metavar="T", help="time of one overlapped F&B chunk in dualpipe(v) "
                                                             "(default F+B+W: overlap hides only communication)")
    comm_cost: float = opt(0.0, metavar="C", help="latency added to every dependency that crosses devices")
    png: str | None = opt(None, metavar="FILE", help="write the timeline picture (one row per device) to FILE")
    json_output: bool = opt(False, flag="--json", help="print the result, timelines included, as JSON")

    def __post_init__(self) -> None:
        check_inputs(self.schedule, self.stages, self.microbatches, self.virtual_stages)
        Costs(forward=self.forward_cost, backward_input=self.backward_input_cost,
              backward_weight=self.backward_weight_cost, overlap=self.overlap_cost, comm=self.comm_cost)
        if self.png is not None and not self.png.lower().endswith(".png"):
            raise CubelmError(f"--png {self.png}: the file name must end in .png")


def run_simulate(o: SimulateOptions) -> int:
    costs = Costs(forward=o.forward_cost, backward_input=o.backward_input_cost, backward_weight=o.backward_weight_cost,
                  overlap=o.overlap_cost, comm=o.comm_cost)
    r = simulate(o.schedule, stages=o.stages, microbatches=o.microbatches, virtual_stages=o.virtual_stages,
                 costs=costs)
    if o.png is not None:
        try:
            plot_timeline(r, o.png)
        except OSError as e:
            raise CubelmError(f"--png {o.png}: cannot write it ({e.strerror or e})") from None
    if o.json_output:
        print(json.dumps(r.to_dict(), indent=2))
        return 0
    print(f"cubelm pipeline simulate: {r.schedule}, p={r.stages}, m={r.microbatches}, v={r.virtual_stages}, "
          f"F={costs.forward:g} B={costs.backward_input:g} W={costs.backward_weight:g}")
    print(f"step time {r.step_time:g}; bubble fraction {r.bubble_fraction:.4f} (one step), "
          f"{r.steady_bubble_fraction:.4f} (steady, no cross-stage optimizer sync)")
    cf = r.closed_form
    if cf is not None:
        print(f"closed form ({cf.view}): {cf.formula} -> bubble {cf.bubble_time:g} per device, "
              f"fraction {cf.fraction:.4f}")
    print("device  busy  idle  peak in-flight chunks  peak activations (1F1B stages)")
    for d in range(r.stages):
        print(f"{d:>6}  {r.busy[d]:>4g}  {r.idle[d]:>4g}  {r.peak_inflight[d]:>21}  {r.peak_activations[d]:>g}")
    if o.png is not None:
        print(f"wrote {o.png}")
    return 0
