"""Pipeline-schedule simulator: timelines, bubble fraction and in-flight activations for p devices and m micro-batches.

    from cubelm.systems.pipeline_sim import simulate
    r = simulate("1f1b", stages=4, microbatches=8)        # F=1, B=1, W=1 (B = backward for inputs)
    r.bubble_fraction, r.closed_form.fraction             # 0.2727..., (p-1)/(m+p-1) = 3/11

Each device runs its ops (``pipeline_schedules``) in order; an op starts when the device is free and every task it
needs has finished (plus ``comm`` if that task ran on another device): F of micro-batch j on stage s needs F j on
s-1; B j on s needs B j on s+1 (F j on the last stage) and F j on s; W needs its B. Costs F, B, W are a device's
share of the model for one micro-batch; a chunk of an interleaved/V schedule costs 1/v of that. Schedules that do not
split the backward run B and W as one op of cost B+W. ``cubelm pipeline simulate`` is in ``pipeline_commands``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cubelm.errors import CubelmError
from cubelm.systems.pipeline_schedules import BUILDERS, SCHEDULES, Op, Schedule, Task

MAX_TASKS = 300_000  # p·m·v·3 tasks: beyond this the pure-Python simulation takes more than a few seconds
FIXED_CHUNKS = {"zbv": 2, "dualpipev": 2, "dualpipe": 2}  # chunks per device the schedule itself decides
COLORS = {"F": "#4C72B0", "B": "#55A868", "W": "#C7A846", "F&B": "#8172B3"}


@dataclass(frozen=True, slots=True)
class Costs:
    forward: float = 1.0
    backward_input: float = 1.0
    backward_weight: float = 1.0
    overlap: float | None = None  # F&B chunk (DualPipe); default F + B + W, i.e. overlap hides only communication
    comm: float = 0.0  # latency added to every dependency that crosses devices

    def __post_init__(self) -> None:
        for name in ("forward", "backward_input"):
            if not getattr(self, name) > 0:
                raise CubelmError(f"--{name.replace('_', '-')}-cost must be > 0, got {getattr(self, name)}")
        for name in ("backward_weight", "comm"):
            if not getattr(self, name) >= 0:
                raise CubelmError(f"--{name.replace('_', '-')}-cost must be >= 0, got {getattr(self, name)}")
        if self.overlap is not None and not self.overlap > 0:
            raise CubelmError(f"--overlap-cost must be > 0, got {self.overlap}")

    @property
    def full_backward(self) -> float:
        return self.backward_input + self.backward_weight


@dataclass(frozen=True, slots=True)
class Slot:
    label: str  # F, B, W or F&B
    microbatch: int  # for F&B: the forward's micro-batch
    stage: int
    start: float
    end: float
    other_microbatch: int | None = None  # F&B: the backward's micro-batch


@dataclass(frozen=True, slots=True)
class ClosedForm:
    bubble_time: float  # idle time per device, as the source states it
    fraction: float  # bubble_time / (busy + bubble_time): the idle share of a device's step
    formula: str
    view: str  # "step" (one step, flush to flush) or "steady" (repeated steps, no cross-stage optimizer sync)


@dataclass(slots=True, kw_only=True)
class SimResult:
    schedule: str
    stages: int
    microbatches: int
    virtual_stages: int
    costs: Costs
    timelines: list[list[Slot]]
    step_time: float
    busy: list[float]
    bubble_fraction: float  # idle / (devices × step time), one step from the first F to the last op
    steady_bubble_fraction: float  # same, per step of a long run in which devices never wait for each other's optimizer
    peak_inflight: list[int]  # chunks forwarded but not yet backward-input'd, per device
    peak_activations: list[float]  # the same in units of one micro-batch through one 1F1B stage (L/p layers)
    closed_form: ClosedForm | None = None

    @property
    def idle(self) -> list[float]:
        return [self.step_time - b for b in self.busy]

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("schedule", "stages", "microbatches", "virtual_stages", "step_time", "busy",
                                           "bubble_fraction", "steady_bubble_fraction", "peak_inflight",
                                           "peak_activations")}
        d.update(costs=asdict(self.costs), idle=self.idle,
                 closed_form=None if self.closed_form is None else asdict(self.closed_form),
                 timelines=[[asdict(s) for s in row] for row in self.timelines])
        return d


# ---- inputs ----------------------------------------------------------------------------------------------------------
def check_inputs(schedule: str, p: int, m: int, v: int | None) -> int:
    """Validate (schedule, p, m, v) the way the papers and their code do; return the chunks per device."""
    if schedule not in BUILDERS:
        raise CubelmError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if p < 1 or m < 1:
        raise CubelmError(f"--stages and --microbatches must be >= 1, got {p} and {m}")
    if schedule in FIXED_CHUNKS:
        if v not in (None, FIXED_CHUNKS[schedule]):
            raise CubelmError(f"{schedule} places exactly 2 model chunks on each device; drop --virtual-stages {v}")
        v = FIXED_CHUNKS[schedule]
    elif schedule == "interleaved-1f1b":
        v = 2 if v is None else v
        if v < 2:
            raise CubelmError(f"interleaved-1f1b needs --virtual-stages >= 2 (got {v}); with 1 it is --schedule 1f1b")
        if m % p:
            raise CubelmError(f"interleaved-1f1b needs --microbatches to be a multiple of --stages (Megatron's rule: "
                              f"micro-batches go round in groups of p); got m={m}, p={p}: try m={p * -(-m // p)}")
    elif v not in (None, 1):
        raise CubelmError(f"{schedule} runs one model chunk per device; --virtual-stages {v} needs "
                          f"--schedule interleaved-1f1b")
    else:
        v = 1
    if schedule == "dualpipe" and (p % 2 or m % 2 or m < 2 * p):
        raise CubelmError(f"dualpipe needs an even --stages and an even --microbatches >= 2 x stages (half of them "
                          f"enter from each end); got p={p}, m={m}")
    if schedule == "dualpipev" and m < 2 * p:
        raise CubelmError(f"dualpipev needs --microbatches >= 2 x stages (its 2p chunks must all be busy before the "
                          f"first backward); got p={p}, m={m}")
    if 3 * p * m * v > MAX_TASKS:
        raise CubelmError(f"p·m·v = {p * m * v} is too large to simulate quickly (limit {MAX_TASKS // 3})")
    return v


def build_schedule(schedule: str, p: int, m: int, v: int | None = None) -> Schedule:
    v = check_inputs(schedule, p, m, v)
    return BUILDERS[schedule](p, m, v) if schedule == "interleaved-1f1b" else BUILDERS[schedule](p, m)


# ---- the simulation --------------------------------------------------------------------------------------------------
def _deps(task: Task, num_stages: int) -> list[Task]:
    if task.kind == "F":
        return [Task("F", task.microbatch, task.stage - 1)] if task.stage > 0 else []
    if task.kind == "B":
        up = Task("B", task.microbatch, task.stage + 1) if task.stage < num_stages - 1 else None
        return [Task("F", task.microbatch, task.stage)] + ([up] if up else [])
    return [Task("B", task.microbatch, task.stage)]


def op_cost(op: Op, s: Schedule, c: Costs) -> float:
    if op.label == "F&B" and c.overlap is not None:
        return c.overlap / s.cost_divisor
    per = {"F": c.forward, "B": c.backward_input, "W": c.backward_weight}
    return sum(per[t.kind] for t in op.tasks) / s.cost_divisor


def run(s: Schedule, c: Costs, *, iterations: int = 1) -> list[list[tuple[Op, float, float]]]:
    """(op, start, end) per device. With ``iterations`` > 1 every device runs its list again right after (a new step
    depends only on the same step's tasks: no cross-stage optimizer sync). Raises RuntimeError on a deadlock."""
    p = s.num_devices
    done: dict[tuple[int, Task], float] = {}  # (iteration, task) -> end time
    where = {t: d for d in range(p) for op in s.ops[d] for t in op.tasks}
    out: list[list[tuple[Op, float, float]]] = [[] for _ in range(p)]
    pos, free = [0] * p, [0.0] * p
    moved = True
    while moved:
        moved = False
        for d in range(p):
            n = len(s.ops[d])
            while pos[d] < n * iterations:
                it, op = pos[d] // n, s.ops[d][pos[d] % n]
                inside = set(op.tasks)
                need = [dep for t in op.tasks for dep in _deps(t, s.num_stages) if dep not in inside]
                if any((it, dep) not in done for dep in need):
                    break
                start = max([free[d]] + [done[(it, dep)] + (c.comm if where[dep] != d else 0.0) for dep in need])
                free[d] = start + op_cost(op, s, c)
                for t in op.tasks:
                    done[(it, t)] = free[d]
                out[d].append((op, start, free[d]))
                pos[d] += 1
                moved = True
    if sum(len(row) for row in out) != sum(len(ops) for ops in s.ops) * iterations:
        stuck = {d: s.ops[d][pos[d] % len(s.ops[d])] for d in range(p) if pos[d] < len(s.ops[d]) * iterations}
        raise RuntimeError(f"{s.name}: the schedule deadlocks; next op per blocked device: {stuck}")
    return out


def _peaks(s: Schedule) -> tuple[list[int], list[float]]:
    """Walk each device's list: +1 per forward chunk, -1 per backward-input chunk (an F&B holds both at once)."""
    weight = 1.0 / s.cost_divisor  # one chunk's activations relative to a full 1F1B stage
    counts = []
    for ops in s.ops:
        live = peak = 0
        for op in ops:
            for t in op.tasks:
                if t.kind == "F":
                    live += 1
                    peak = max(peak, live)
                elif t.kind == "B":
                    live -= 1
        counts.append(peak)
    return counts, [k * weight for k in counts]


def simulate(schedule: str, *, stages: int, microbatches: int, virtual_stages: int | None = None,
             costs: Costs | None = None) -> SimResult:
    c = costs or Costs()
    s = build_schedule(schedule, stages, microbatches, virtual_stages)
    rows = run(s, c)
    step = max(end for row in rows for _, _, end in row)
    busy = [sum(e - b for _, b, e in row) for row in rows]
    steady = _steady_period(s, c)
    peak_n, peak_a = _peaks(s)
    timelines = [[_slot(op, b, e) for op, b, e in row] for row in rows]
    r = SimResult(schedule=schedule, stages=stages, microbatches=microbatches, virtual_stages=s.chunks_per_device,
                  costs=c, timelines=timelines, step_time=step, busy=busy,
                  bubble_fraction=1 - sum(busy) / (stages * step),
                  steady_bubble_fraction=max(0.0, 1 - sum(busy) / (stages * steady)),
                  peak_inflight=peak_n, peak_activations=peak_a)
    r.closed_form = closed_form(r)
    return r


def _steady_period(s: Schedule, c: Costs) -> float:
    """Time per step once a run has settled: steps 2 and 3 of a three-step run without optimizer sync (ZB §4's
    post-validation lets the next step start on a device as soon as it has finished its own ops)."""
    ends = [[max(e for _, _, e in row[k * len(s.ops[d]):(k + 1) * len(s.ops[d])]) for k in range(3)]
            for d, row in enumerate(run(s, c, iterations=3))]
    return max(e[2] for e in ends) - max(e[1] for e in ends)


def _slot(op: Op, start: float, end: float) -> Slot:
    other = op.tasks[1].microbatch if op.label == "F&B" else None
    return Slot(op.label, op.tasks[0].microbatch, op.tasks[0].stage, start, end, other)


# ---- closed forms ----------------------------------------------------------------------------------------------------
def closed_form(r: SimResult) -> ClosedForm | None:
    """The literature's bubble for this schedule, in our cost convention (B = backward for inputs, so the DeepSeek
    table's "B" (a full backward) is our B+W). ``fraction`` = bubble / (busy per device + bubble)."""
    p, v, c = r.stages, r.virtual_stages, r.costs
    f, b, w = c.forward, c.backward_input, c.backward_weight
    busy = min(r.busy)  # NOTE: only DualPipe with --overlap-cost has unequal busy; its formula is the idlest device's
    name = r.schedule
    if name in ("gpipe", "1f1b"):
        # NOTE: the book (ch. 13.1.2) prints (1-m)/(m+n-1), which is negative for m > 1: a misprint for (n-1)/(m+n-1).
        t, text, view = (p - 1) * (f + b + w), "(p-1)(F+B+W); fraction (p-1)/(m+p-1)", "step"
    elif name == "interleaved-1f1b":
        t, text, view = (p - 1) * (f + b + w) / v, "(p-1)(F+B+W)/v; fraction (p-1)/(v·m+p-1)", "step"
    elif name == "zb-h1":
        t, text, view = (p - 1) * (f + b - w), "(p-1)(F+B-W) (Qi et al. Table 2)", "step"
    elif name == "zb-h2":
        t, text, view = max(0.0, (p - 1) * (f + b - 2 * w)), "(p-1)(F+B-2W) (Qi et al. Table 2)", "steady"
    elif name == "zbv":
        t, text, view = 0.0, "0 when F=B=W and m >= 2p (Qi et al. §6)", "steady"
    elif name in ("dualpipe", "dualpipev"):
        # DeepSeek-V3 Table 2 in chunk units: F&B + B_full - 3W = F&B + B - 2W in ours. DualPipeV is DualPipe on
        # 2p half-size stages folded onto p devices, so PP = 2p and every chunk costs half.
        pp, k = (p, 1) if name == "dualpipe" else (2 * p, 2)
        fb = (c.overlap if c.overlap is not None else f + b + w) / k
        t = max(0.0, (pp / 2 - 1) * (fb + (b - 2 * w) / k))
        text, view = "(PP/2-1)(F&B+B-3W), B = full backward (DeepSeek-V3 Table 2)", "step"
    else:
        return None
    return ClosedForm(bubble_time=t, fraction=t / (busy + t), formula=text, view=view)


def compare_with_measured(sim_result: SimResult, measured_busy_idle: list[tuple[float, float]]) -> dict:
    """Predicted vs measured idle per device. ``measured_busy_idle[d] = (busy_seconds, idle_seconds)`` of rank d in one
    step of a real run. The simulation is scaled so its step time equals the measured step (busy + idle of the slowest
    rank): the prediction is then in seconds, and ``ratio`` = measured idle / predicted idle per device."""
    if len(measured_busy_idle) != sim_result.stages:
        raise CubelmError(f"measured {len(measured_busy_idle)} ranks, simulated {sim_result.stages} stages")
    measured_step = max(bi + id_ for bi, id_ in measured_busy_idle)
    scale = measured_step / sim_result.step_time
    rows = []
    for d, (busy, idle) in enumerate(measured_busy_idle):
        predicted = sim_result.idle[d] * scale
        rows.append({"device": d, "measured_busy": busy, "measured_idle": idle, "predicted_idle": predicted,
                     "ratio": idle / predicted if predicted > 0 else None})
    measured_fraction = sum(i for _, i in measured_busy_idle) / sum(b + i for b, i in measured_busy_idle)
    return {"schedule": sim_result.schedule, "predicted_bubble_fraction": sim_result.bubble_fraction,
            "measured_bubble_fraction": measured_fraction, "devices": rows}


# ---- the picture -----------------------------------------------------------------------------------------------------
def plot_timeline(r: SimResult, path: str) -> None:
    """One row per device, a box per op colored by type, the micro-batch in the box (F&B: "fwd/bwd")."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    width = min(40.0, max(8.0, 0.25 * sum(len(row) for row in r.timelines) / r.stages))
    fig, ax = plt.subplots(figsize=(width, 0.6 * r.stages + 1.6))
    for d, row in enumerate(r.timelines):
        for sl in row:
            ax.broken_barh([(sl.start, sl.end - sl.start)], (d - 0.4, 0.8), facecolors=COLORS[sl.label],
                           edgecolors="black", linewidth=0.4)
            text = str(sl.microbatch) if sl.other_microbatch is None else f"{sl.microbatch}/{sl.other_microbatch}"
            ax.text((sl.start + sl.end) / 2, d, text, ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(r.stages), [f"device {d}" for d in range(r.stages)])
    ax.invert_yaxis()
    ax.set_xlim(0, r.step_time)
    ax.set_xlabel("time")
    labels = sorted({sl.label for row in r.timelines for sl in row}, key=list(COLORS).index)
    ax.legend(handles=[Patch(color=COLORS[k], label=k) for k in labels], loc="upper left", bbox_to_anchor=(1.0, 1.0),
              fontsize=8)
    ax.set_title(f"{r.schedule}: p={r.stages}, m={r.microbatches}, v={r.virtual_stages}: "
                 f"bubble {r.bubble_fraction:.1%} (steady {r.steady_bubble_fraction:.1%})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["Costs", "SimResult", "Slot", "ClosedForm", "SCHEDULES", "simulate", "build_schedule", "run",
           "closed_form", "compare_with_measured", "plot_timeline", "check_inputs"]
