"""Pipeline-parallel schedules as data: each device's ordered list of operations (no torch).

A micro-batch walks a *route* of virtual stages 0..S-1 (S = p for GPipe/1F1B/ZB-H*, p·v for interleaved 1F1B, 2p for
the V-shaped ZB-V and DualPipeV); ``Schedule.device_of(mb, stage)`` says which device holds that stage (DualPipe
sends half of the micro-batches along the reversed route). A ``Task`` is one node of the dependency graph (F, B =
backward for inputs, W = backward for weights); an ``Op`` is what a device runs in one go: a single task, a full
backward (B then W, for schedules that do not split it) or DualPipe's overlapped F&B chunk. ``pipeline_sim`` runs these
lists. The orders follow the papers: GPipe (Huang et al. 2019), 1F1B (Narayanan et al. 2021, PipeDream-Flush),
interleaved 1F1B (Narayanan et al. 2021, Megatron's warm-up rule), ZB-H1/ZB-H2/ZB-V (Qi et al. 2024, Figure 3 and
§6), DualPipe (DeepSeek-V3 report §3.2.1 and the step structure of the DualPipe repository's ``step``) and DualPipeV
(the same eight steps on a V-shaped placement).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True, slots=True)
class Task:
    kind: str  # "F", "B" (backward for inputs) or "W" (backward for weights)
    microbatch: int
    stage: int  # virtual stage along the micro-batch's route, 0 = first layers


@dataclass(frozen=True, slots=True)
class Op:
    tasks: tuple[Task, ...]
    label: str  # "F", "B", "W" or "F&B"; a full backward (B and W fused) is drawn as "B"

    @property
    def microbatch(self) -> int:
        return self.tasks[0].microbatch


@dataclass(slots=True, kw_only=True)
class Schedule:
    name: str
    num_devices: int
    num_microbatches: int
    num_stages: int  # virtual stages per route
    chunks_per_device: int  # model chunks a device holds (2 for ZB-V, DualPipe, DualPipeV)
    cost_divisor: int  # a task costs F/cost_divisor: a chunk holds 1/v of a device's share of layers
    device_of: Callable[[int, int], int]
    ops: list[list[Op]] = field(default_factory=list)


def _single(kind: str, mb: int, stage: int) -> Op:
    return Op((Task(kind, mb, stage),), kind)


def _full_backward(mb: int, stage: int) -> Op:
    return Op((Task("B", mb, stage), Task("W", mb, stage)), "B")


# ---- one chunk per device: GPipe, 1F1B, ZB-H1, ZB-H2 -----------------------------------------------------------------
def _looped(name: str, p: int, m: int, build: Callable[[int], list[Op]]) -> Schedule:
    s = Schedule(name=name, num_devices=p, num_microbatches=m, num_stages=p, chunks_per_device=1, cost_divisor=1,
                 device_of=lambda mb, stage: stage)
    s.ops = [build(d) for d in range(p)]
    return s


def gpipe(p: int, m: int) -> Schedule:
    """All forwards, then all (full) backwards."""
    return _looped("gpipe", p, m,
                   lambda d: [_single("F", j, d) for j in range(m)] + [_full_backward(j, d) for j in range(m)])


def one_f_one_b(p: int, m: int) -> Schedule:
    """PipeDream-Flush: stage d warms up with p-d-1 forwards, then alternates F and (full) B, then drains."""
    def build(d: int) -> list[Op]:
        warmup = min(p - d - 1, m)
        ops = [_single("F", j, d) for j in range(warmup)]
        for i in range(m - warmup):
            ops += [_single("F", warmup + i, d), _full_backward(i, d)]
        return ops + [_full_backward(j, d) for j in range(m - warmup, m)]
    return _looped("1f1b", p, m, build)


def _zero_bubble_handcrafted(name: str, p: int, m: int, *, warmup_of, w_lag_of, f_first: bool) -> Schedule:
    """ZB-H1 / ZB-H2 (Qi et al. 2024, Figure 3): after ``warmup`` forwards, step i runs B_i, the W that lags ``w_lag``
    backward passes behind it, and the next F (before B_i in ZB-H1, after W in ZB-H2); leftover Ws run at the end."""
    def build(d: int) -> list[Op]:
        warmup, lag = min(warmup_of(d), m), w_lag_of(d)
        ops = [_single("F", j, d) for j in range(warmup)]
        next_w = 0
        for i in range(m):
            f = [_single("F", warmup + i, d)] if warmup + i < m else []
            w = [_single("W", i - lag, d)] if i - lag >= 0 else []
            next_w += len(w)
            ops += f + [_single("B", i, d)] + w if f_first else [_single("B", i, d)] + w + f
        return ops + [_single("W", j, d) for j in range(next_w, m)]
    return _looped(name, p, m, build)


def zb_h1(p: int, m: int) -> Schedule:
    """1F1B's warm-up; device d delays its Ws by d backward passes, so every device holds p micro-batches at most
    and the late Ws fill the tail bubble: bubble (p-1)(F+B-W), a third of 1F1B's when F=B=W."""
    return _zero_bubble_handcrafted("zb-h1", p, m, warmup_of=lambda d: p - d - 1, w_lag_of=lambda d: d, f_first=True)


def zb_h2(p: int, m: int) -> Schedule:
    """2(p-d)-1 warm-up forwards fill the bubble before the first B; Ws lag 2d backward passes (the parallelogram)."""
    return _zero_bubble_handcrafted("zb-h2", p, m, warmup_of=lambda d: 2 * (p - d) - 1, w_lag_of=lambda d: 2 * d,
                                    f_first=False)


# ---- interleaved 1F1B ------------------------------------------------------------------------------------------------
def interleaved_1f1b(p: int, m: int, v: int) -> Schedule:
    """Megatron's interleaved schedule: device d holds chunks d, d+p, ..., d+(v-1)p. Units are taken in groups of p
    micro-batches per chunk (hence m must be a multiple of p); warm-up 2(p-d-1) + (v-1)p units, or all of them when
    m == p (Megatron then runs all forwards before all backwards)."""
    total = m * v

    def unit(u: int, backward: bool) -> tuple[int, int]:
        chunk = (u // p) % v
        return (u // (p * v)) * p + u % p, (v - 1 - chunk if backward else chunk)

    def build(d: int) -> list[Op]:
        warmup = total if m == p else min(2 * (p - d - 1) + (v - 1) * p, total)
        fwd = [_single("F", mb, c * p + d) for mb, c in (unit(u, False) for u in range(total))]
        bwd = [_full_backward(mb, c * p + d) for mb, c in (unit(u, True) for u in range(total))]
        ops = fwd[:warmup]
        for i in range(total - warmup):
            ops += [fwd[warmup + i], bwd[i]]
        return ops + bwd[total - warmup:]

    s = Schedule(name="interleaved-1f1b", num_devices=p, num_microbatches=m, num_stages=p * v, chunks_per_device=v,
                 cost_divisor=v, device_of=lambda mb, stage: stage % p)
    s.ops = [build(d) for d in range(p)]
    return s


# ---- V-shaped placement: ZB-V and DualPipeV --------------------------------------------------------------------------
def _v_shape(name: str, p: int, m: int) -> Schedule:
    # NOTE: stage k lives on device k going down the V and on device 2p-1-k coming back, so device 0 holds the first
    # and the last chunk and the loss is computed where the input entered.
    return Schedule(name=name, num_devices=p, num_microbatches=m, num_stages=2 * p, chunks_per_device=2, cost_divisor=2,
                    device_of=lambda mb, stage: stage if stage < p else 2 * p - 1 - stage)


def zbv(p: int, m: int) -> Schedule:
    """ZB-V (Qi et al. 2024 §6): warm-up 2(p-d)-1 forwards of chunk 0, d pairs (F1, F0), p-d triples (F1, B1, W1);
    steady F0 B0 W0 F1 B1 W1; cool-down d pairs (B0, B1), p-d pairs (B0, W0), then the remaining Ws. Built for
    max(m, 2p-1) micro-batches and the ones past m dropped, as torch's ScheduleZBVZeroBubble does."""
    n = max(m, 2 * p - 1)
    s = _v_shape("zbv", p, m)
    for d in range(p):
        c0, c1 = d, 2 * p - 1 - d
        cnt = {"F0": 0, "F1": 0, "B0": 0, "B1": 0, "W0": 0, "W1": 0}
        ops: list[Op] = []

        def add(kind: str, chunk: int) -> None:
            key = f"{kind}{chunk}"
            ops.append(_single(kind, cnt[key], c0 if chunk == 0 else c1))
            cnt[key] += 1
        for _ in range(2 * (p - d) - 1):
            add("F", 0)
        for _ in range(d):
            add("F", 1), add("F", 0)
        for _ in range(p - d):
            add("F", 1), add("B", 1), add("W", 1)
        while cnt["F1"] < cnt["F0"] or cnt["F0"] < n:
            if cnt["F0"] < n:
                add("F", 0)
            add("B", 0), add("W", 0), add("F", 1), add("B", 1), add("W", 1)
        for _ in range(d):
            add("B", 0), add("B", 1)
        for _ in range(p - d):
            add("B", 0), add("W", 0)
        while cnt["W1"] < cnt["B1"]:
            add("W", 1)
        while cnt["W0"] < cnt["B0"]:
            add("W", 0)
        s.ops.append([op for op in ops if op.microbatch < m])
    return s


def _dualpipe_device(*, n: int, h: int, per_phase: int, forward, backward, overlap, weight) -> None:
    """The eight steps of DualPipe's ``step`` for one device (half-rank ``h`` of ``n``), ``per_phase`` micro-batches
    per phase. Phase 0 is the chunk this device runs early in its route, phase 1 the late one. ``backward(phase,
    split)`` with ``split=True`` defers the W to a FIFO that ``weight()`` pops."""
    for _ in range(2 * (n - h - 1)):  # 1: forwards of phase 0
        forward(0)
    for _ in range(h + 1):  # 2: F0 F1
        forward(0), forward(1)
    for _ in range(n - h - 1):  # 3: B1 W1 F1 (zero bubble)
        backward(1, True), weight(), forward(1)
    for i in range(per_phase - 2 * n + h + 1):  # 4: the main loop, F0&B1 then F1&B0
        if i == 0 and h == n - 1:  # NOTE: the middle device does not overlap its first pair (smaller bubble)
            forward(0), backward(1, False)
        else:
            overlap(0, 1)
        overlap(1, 0)
    for _ in range(n - h - 1):  # 5: B1, F1&B0
        backward(1, False), overlap(1, 0)
    split = False
    for i in range(h + 1):  # 6: B1 B0, the second half with the split backward
        split = split or (i == (h + 1) // 2 and h % 2 == 1)
        backward(1, split)
        split = split or (i == (h + 1) // 2 and h % 2 == 0)
        backward(0, split)
    for _ in range(n - h - 1):  # 7: W, B0
        weight(), backward(0, True)
    for _ in range(h + 1):  # 8: the remaining Ws
        weight()


def _dualpipe_family(s: Schedule, *, n: int, per_phase: int, place) -> Schedule:
    """``place(d, phase) -> (stage, first micro-batch id)`` for the chunk a device runs in that phase."""
    for d in range(s.num_devices):
        ops: list[Op] = []
        nxt = {("F", 0): 0, ("F", 1): 0, ("B", 0): 0, ("B", 1): 0}
        pending_w: deque[Task] = deque()

        def take(kind: str, phase: int) -> tuple[int, int]:
            stage, first = place(d, phase)
            j = nxt[(kind, phase)]
            nxt[(kind, phase)] += 1
            return first + j, stage

        def forward(phase: int) -> None:
            ops.append(_single("F", *take("F", phase)))

        def backward(phase: int, split: bool) -> None:
            mb, stage = take("B", phase)
            if split:
                pending_w.append(Task("W", mb, stage))
                ops.append(_single("B", mb, stage))
            else:
                ops.append(_full_backward(mb, stage))

        def overlap(f_phase: int, b_phase: int) -> None:
            fmb, fst = take("F", f_phase)
            bmb, bst = take("B", b_phase)
            ops.append(Op((Task("F", fmb, fst), Task("B", bmb, bst), Task("W", bmb, bst)), "F&B"))

        def weight() -> None:
            ops.append(Op((pending_w.popleft(),), "W"))

        _dualpipe_device(n=n, h=min(d, s.num_devices - 1 - d) if s.name == "dualpipe" else d, per_phase=per_phase,
                         forward=forward, backward=backward, overlap=overlap, weight=weight)
        s.ops.append(ops)
    return s


def dualpipe(p: int, m: int) -> Schedule:
    """Bidirectional: micro-batches 0..m/2-1 enter at device 0, m/2..m-1 at device p-1 (two copies of the model;
    device d holds stage d of one and stage p-1-d of the other)."""
    half = m // 2
    s = Schedule(name="dualpipe", num_devices=p, num_microbatches=m, num_stages=p, chunks_per_device=2, cost_divisor=1,
                 device_of=lambda mb, stage: stage if mb < half else p - 1 - stage)

    def place(d: int, phase: int) -> tuple[int, int]:
        reverse = (d >= p // 2) != (phase == 1)  # phase 0 = the direction in which d is in the first half
        return (p - 1 - d if reverse else d), (half if reverse else 0)
    return _dualpipe_family(s, n=p // 2, per_phase=half, place=place)


def dualpipev(p: int, m: int) -> Schedule:
    """DualPipe cut in half: one direction, 2p stages in a V, each device running DualPipe's steps on its two chunks."""
    s = _v_shape("dualpipev", p, m)
    return _dualpipe_family(s, n=p, per_phase=m, place=lambda d, phase: (d if phase == 0 else 2 * p - 1 - d, 0))


BUILDERS: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe, "1f1b": one_f_one_b, "interleaved-1f1b": interleaved_1f1b, "zb-h1": zb_h1, "zb-h2": zb_h2,
    "zbv": zbv, "dualpipe": dualpipe, "dualpipev": dualpipev,
}
SCHEDULES: tuple[str, ...] = tuple(BUILDERS)
