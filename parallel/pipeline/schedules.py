"""Pipeline schedules as data, and a pure-Python validator/simulator for them.

A schedule is, for each of the p pipeline ranks, an ordered list of `Action`s:

    F(i, s)  forward of micro-batch i through virtual stage s
    B(i, s)  backward of it (input and weight gradients; with zero-bubble: input gradient only)
    W(i, s)  weight gradient of it (zero-bubble schedules only)

Virtual stage s (0 <= s < p * v) lives on rank s % p; with v = 1 stage s is rank s. Communication is
implied by the actions: F(i, s) needs the activation sent by F(i, s - 1) and sends its own to s + 1;
B(i, s) needs the gradient sent by B(i, s + 1) and sends its own to s - 1 (the last stage's B starts
from the loss). Sends never block (they are posted and completed later); a receive blocks until the
matching send has been posted. `simulate` executes that model: it proves every receive is matched,
finds deadlocks, measures the bubble for given action costs and counts micro-batches in flight.

Bubble formulas with uniform stages (t_B = 2 t_F): GPipe and 1F1B (p - 1) / (m + p - 1); interleaved
1F1B with v virtual stages per rank (p - 1) / (v m + p - 1); ZB-H1 about a third of 1F1B's, keeping
1F1B's memory (at most p micro-batches in flight per rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb1p")


@dataclass(frozen=True)
class Action:
    kind: str  # "F", "B" or "W"
    microbatch: int
    stage: int

    def __repr__(self) -> str:
        return f"{self.kind}{self.microbatch}@{self.stage}"


Schedule = list[list[Action]]


def _check(p: int, m: int, v: int = 1) -> None:
    if p < 1 or m < 1 or v < 1:
        raise ValueError(
            f"pipeline: need pp >= 1, num_microbatches >= 1, virtual_stages >= 1 (got {p}, {m}, {v})"
        )


def schedule_gpipe(p: int, m: int) -> Schedule:
    """All forwards, then all backwards (in the same micro-batch order)."""
    _check(p, m)
    return [[Action("F", i, r) for i in range(m)] + [Action("B", i, r) for i in range(m)] for r in range(p)]


def schedule_1f1b(p: int, m: int) -> Schedule:
    """Rank r runs min(p - r - 1, m) warm-up forwards, then alternates one forward and one backward."""
    _check(p, m)
    schedule = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        actions = [Action("F", i, r) for i in range(warmup)]
        for i in range(m - warmup):
            actions += [Action("F", warmup + i, r), Action("B", i, r)]
        actions += [Action("B", i, r) for i in range(m - warmup, m)]
        schedule.append(actions)
    return schedule


def schedule_interleaved_1f1b(p: int, m: int, v: int) -> Schedule:
    """Megatron's interleaved 1F1B: each rank holds v model chunks (stages r, r + p, ..., r + (v-1) p).

    Micro-batches go through the chunks in groups of p: forward unit k runs micro-batch
    (k // (p v)) p + k % p on chunk (k // p) % v; backward units run the chunks in reverse order.
    Requires m % p == 0.
    """
    _check(p, m, v)
    if m % p:
        raise ValueError(
            f"distributed.num_microbatches={m}: interleaved 1F1B needs a multiple of pp={p} micro-batches"
        )
    total = m * v

    def unit(k: int, backward: bool) -> tuple[int, int]:
        chunk = (k // p) % v
        if backward:
            chunk = v - 1 - chunk
        return (k // (p * v)) * p + k % p, chunk

    schedule = []
    for r in range(p):
        warmup = min((p - r - 1) * 2 + (v - 1) * p, total)
        actions = []
        for k in range(warmup):
            i, c = unit(k, False)
            actions.append(Action("F", i, c * p + r))
        for k in range(total - warmup):
            i, c = unit(warmup + k, False)
            actions.append(Action("F", i, c * p + r))
            i, c = unit(k, True)
            actions.append(Action("B", i, c * p + r))
        for k in range(total - warmup, total):
            i, c = unit(k, True)
            actions.append(Action("B", i, c * p + r))
        schedule.append(actions)
    return schedule


def schedule_zb_h1(p: int, m: int, costs: dict[str, float] | None = None) -> Schedule:
    """ZB-H1 (Qi et al. 2024): 1F1B's order of F and B, with the backward split into B (input gradient,
    on the critical path) and W (weight gradient, deferred to fill the bubbles).

    The W's are placed by list-scheduling that order under uniform `costs` (event by event, earliest
    first): a rank whose next F or B is not ready runs a pending W instead of idling, and a rank with p
    micro-batches in flight (forwarded, weight gradient not yet done) retires a W before its next F, so
    activation memory stays at 1F1B's.
    """
    _check(p, m)
    costs = costs or {"F": 1.0, "B": 1.0, "W": 1.0}
    base = schedule_1f1b(p, m)
    finish: dict[Action, float] = {}
    clock, position, in_flight = [0.0] * p, [0] * p, [0] * p
    pending: list[list[Action]] = [[] for _ in range(p)]
    out: Schedule = [[] for _ in range(p)]

    def decision(r: int) -> tuple[float, Action] | None:
        nxt = base[r][position[r]] if position[r] < len(base[r]) else None
        dep = None if nxt is None else _dependency(nxt, p, p)
        ready = None if nxt is None else (0.0 if dep is None else finish.get(dep))
        if nxt is not None and nxt.kind == "F" and in_flight[r] >= p and pending[r]:
            return clock[r], pending[r][0]
        if ready is not None and ready <= clock[r]:
            return clock[r], nxt
        if pending[r]:
            return clock[r], pending[r][0]
        if ready is not None:
            return ready, nxt
        return None

    while any(position[r] < len(base[r]) or pending[r] for r in range(p)):
        options = [(d[0], r, d[1]) for r in range(p) if (d := decision(r)) is not None]
        if not options:
            raise RuntimeError("zb1p: no rank can act (internal error)")
        start, r, action = min(options, key=lambda o: (o[0], o[1]))
        clock[r] = start + costs[action.kind]
        finish[action] = clock[r]
        out[r].append(action)
        if action.kind == "W":
            pending[r].pop(0)
            in_flight[r] -= 1
        else:
            position[r] += 1
            if action.kind == "F":
                in_flight[r] += 1
            else:
                pending[r].append(Action("W", action.microbatch, action.stage))
    return out


def build_schedule(name: str, p: int, m: int, v: int = 1) -> Schedule:
    """The named schedule for p ranks, m micro-batches and v virtual stages per rank."""
    if name not in SCHEDULES:
        raise ValueError(f"distributed.pp_schedule={name!r}: expected one of {', '.join(SCHEDULES)}")
    if v > 1 and name != "interleaved_1f1b":
        raise ValueError(
            f"distributed.virtual_stages={v}: only the interleaved_1f1b schedule uses virtual stages"
        )
    if name == "gpipe":
        return schedule_gpipe(p, m)
    if name == "1f1b":
        return schedule_1f1b(p, m)
    if name == "zb1p":
        return schedule_zb_h1(p, m)
    if v < 2:
        raise ValueError("distributed.pp_schedule='interleaved_1f1b' needs distributed.virtual_stages >= 2")
    return schedule_interleaved_1f1b(p, m, v)


def _dependency(action: Action, p: int, num_stages: int) -> Action | None:
    """The remote action whose send this one receives, or None (inputs from the data / the loss)."""
    if action.kind == "F":
        return Action("F", action.microbatch, action.stage - 1) if action.stage > 0 else None
    if action.kind == "B":
        if action.stage < num_stages - 1:
            return Action("B", action.microbatch, action.stage + 1)
        return None
    return None


@dataclass
class Simulation:
    makespan: float
    busy: list[float]
    bubble: float  # idle fraction of p * makespan
    peak_in_flight: list[int]  # micro-batches whose activations are held, per rank
    finish: dict[Action, float] = field(repr=False, default_factory=dict)


def simulate(schedule: Schedule, v: int = 1, costs: dict[str, float] | None = None) -> Simulation:
    """Run the schedule on an ideal machine (zero-latency links, non-blocking sends).

    Checks: every action appears once and in a valid local order (F before B before W of the same
    micro-batch and stage, each stage on its rank); every receive has its send; no deadlock. Costs are
    per action on a stage of one virtual chunk; defaults F=1, B=2 (or B=1, W=1 when W actions exist),
    each divided by v for interleaved chunks.
    """
    p = len(schedule)
    num_stages = p * v
    kinds = sorted({a.kind for actions in schedule for a in actions})
    has_w = "W" in kinds
    costs = costs or ({"F": 1.0, "B": 1.0, "W": 1.0} if has_w else {"F": 1.0, "B": 2.0, "W": 0.0})
    m = len({a.microbatch for actions in schedule for a in actions})
    expected = {Action(k, i, s) for i in range(m) for s in range(num_stages) for k in kinds}
    seen = [a for actions in schedule for a in actions]
    if len(seen) != len(set(seen)) or set(seen) != expected:
        missing, extra = expected - set(seen), set(seen) - expected
        raise ValueError(
            f"schedule is incomplete or repeats actions: missing {sorted(missing, key=repr)[:5]}, "
            f"unexpected {sorted(extra, key=repr)[:5]}"
        )
    for r, actions in enumerate(schedule):
        for a in actions:
            if a.stage % p != r:
                raise ValueError(f"{a} is on rank {r}, but stage {a.stage} belongs to rank {a.stage % p}")
        order = {a: k for k, a in enumerate(actions)}
        for a in actions:
            if a.kind in "BW" and order.get(Action("F", a.microbatch, a.stage), -1) > order[a]:
                raise ValueError(f"rank {r}: {a} comes before its forward")
            if a.kind == "W" and order[Action("B", a.microbatch, a.stage)] > order[a]:
                raise ValueError(f"rank {r}: {a} comes before its input-gradient backward")

    finish: dict[Action, float] = {}
    clock, position = [0.0] * p, [0] * p
    busy = [0.0] * p
    held, peak = [0] * p, [0] * p
    remaining = sum(len(a) for a in schedule)
    while remaining:
        progressed = False
        for r in range(p):
            while position[r] < len(schedule[r]):
                action = schedule[r][position[r]]
                dep = _dependency(action, p, num_stages)
                if dep is not None and dep not in finish:
                    break
                start = max(clock[r], finish[dep] if dep is not None else 0.0)
                cost = costs[action.kind] / v
                clock[r] = start + cost
                busy[r] += cost
                finish[action] = clock[r]
                position[r] += 1
                remaining -= 1
                progressed = True
                releases = "W" if has_w else ("B" if "B" in kinds else "F")
                held[r] += 1 if action.kind == "F" else (-1 if action.kind == releases else 0)
                peak[r] = max(peak[r], held[r])
        if not progressed:
            stuck = {r: schedule[r][position[r]] for r in range(p) if position[r] < len(schedule[r])}
            raise RuntimeError(f"schedule deadlocks: ranks wait on {stuck}")
    makespan = max(clock)
    bubble = 1.0 - sum(busy) / (p * makespan) if makespan > 0 else 0.0
    return Simulation(makespan=makespan, busy=busy, bubble=bubble, peak_in_flight=peak, finish=finish)


def bubble_formula(name: str, p: int, m: int, v: int = 1) -> float:
    """The textbook bubble fraction of a schedule with uniform stages and t_B = 2 t_F."""
    if name == "interleaved_1f1b":
        return (p - 1) / (v * m + p - 1)
    return (p - 1) / (m + p - 1)
