"""Discrete-event model of the chain of Ray Data actor pools, to predict pipeline efficiency on any GPU count.

It follows Ray Data 2.60 running `pipeline.run.chain_stages`, as read in its source and checked against
traced runs of `benchmarks.simulation` (docs/BENCHMARKS.md):

- The streaming executor is one thread running a loop: it blocks in `ray.wait` for up to 0.1 s, takes in
  the tasks that finished, dispatches, and works a little more. Each dispatch costs the thread time, so a
  loop that hands out many tasks is long. A task that ends is noticed at the end of the wait covering it;
  its output reaches the next operator, and its actor slot frees, on that loop or one or two later (block
  metadata is fetched on a background thread, for the operators in topology order).
- Each stage's pool hands a bundle to the actor with the fewest tasks in flight (at most
  `tasks_in_flight_per_actor`); ties go to the actor whose count changed last (the pool's heap), whatever
  GPU the actor sits on.
- An actor runs its tasks one at a time, each starting a few milliseconds after the actor is free and has
  it. A task needs the actor's GPU exclusively; actors sharing a GPU queue for it first come, first served.
- Rows come from the source in blocks of `source_block_rows`, cut into blocks of the first stage's batch.
  A stage whose batch differs from the one before it gets a repartition in between: one more operator, so
  one more loop and emit delay. A stage bundles whole blocks until it has at least its batch of rows, and
  a task's output is one block per batch.

Throughput counts from the first batch the first stage begins to the last batch the last stage ends.
Efficiency divides it by the bound: GPUs over the sum of the stages' seconds per row.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import time
from collections import deque
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ActorSpec:
    stage: str
    gpu: int | None
    """Index of the GPU the actor is pinned to; None: no GPU (never waits for one)."""


@dataclass(frozen=True)
class StageTiming:
    batch_overhead_s: float
    """Seconds per batch, whatever its size."""
    seconds_per_row: float
    """Seconds per row in the batch: a batch of n rows holds its GPU for batch_overhead_s + n x this."""
    batch_rows: int
    """Rows per batch handed to an actor."""


@dataclass
class EventResult:
    rows: int
    span_s: float
    throughput: float
    gpu_busy: list[float]
    """Fraction of the span each GPU was held."""


@dataclass(frozen=True)
class RayOverheads:
    """Ray Data's own latencies. The defaults were measured on traced Ray runs of the simulation benchmark
    on the project's 2-core machine (8 to 48 actors)."""

    loop_wait_s: float = 0.1
    """The executor loop's `ray.wait` timeout. 0: finished tasks are noticed and replaced at once."""
    loop_work_s: float = 0.015
    """Mean seconds each loop works after its wait besides dispatching (spread evenly over 0 to twice it)."""
    dispatch_s: float = 0.008
    """Seconds of the loop's single thread per task it dispatches (it re-ranks the operators and recomputes
    every operator's resource budget after each one; 5 to 9 ms with six pools on the 2-core machine). A loop
    that dispatches many tasks is long, and the thread caps the whole chain at 1 / dispatch_s tasks/s."""
    emit_on_time: tuple[float, ...] = (0.45, 0.6, 0.77, 0.82, 0.86, 0.91)
    """Chance that a task's output goes out (and its slot frees) on the loop that notices it, for the last
    stage, the one before it, and so on (further up: the last value). The metadata thread fetches for the
    operators in topology order, so the later stages more often miss the loop's emit pass."""
    two_loops_late: float = 0.15
    """Of the outputs that miss it, the share that waits two loops rather than one."""
    task_start_s: float = 0.005
    """Least seconds from an actor being free and having a task to the task beginning."""
    task_start_jitter_s: float = 0.009
    """Mean of an exponentially spread extra delay on top of task_start_s."""
    hold_overrun_s: float = 0.0
    """Seconds a task holds its GPU beyond its cost (timer slack of the stand-in actors)."""
    gpu_handover_s: float = 0.0
    """Seconds a GPU sits idle between one actor releasing it and the next waiting actor taking it."""

    def loop_s(self) -> float:
        """Mean seconds per executor loop when it has little to dispatch."""
        return self.loop_wait_s + self.loop_work_s


NO_OVERHEADS = RayOverheads(loop_wait_s=0.0, loop_work_s=0.0, dispatch_s=0.0, emit_on_time=(1.0,),
                            two_loops_late=0.0, task_start_s=0.0, task_start_jitter_s=0.0)
"""An ideal dispatcher: a finished task is replaced the moment it ends."""

THIS_MACHINE = RayOverheads(hold_overrun_s=0.0015, gpu_handover_s=0.0015)
"""The simulation benchmark on the project's 2-core machine, where the stand-in actors' sleeps overrun and
their lock hand-overs lag by about 1.5 ms each."""


def bound_rows_per_s(order: list[str], timing: dict[str, StageTiming], gpus: int) -> float:
    """Rows/s no schedule can beat: every GPU-second spent on useful work."""
    per_row = sum(timing[name].seconds_per_row + timing[name].batch_overhead_s / timing[name].batch_rows
                  for name in order)
    return gpus / per_row


def efficiency(result: EventResult, order: list[str], timing: dict[str, StageTiming], gpus: int) -> float:
    return result.throughput / bound_rows_per_s(order, timing, gpus)


class _LeastLoaded:
    """The actor pool's choice of actor: fewest tasks in flight; among equals, the one updated last.

    A binary heap in which an entry (re)inserted with a count equal to its parent's climbs above it: that
    is what makes the last-updated actor win ties in Ray Data's pool (checked against traced dispatches).
    """

    def __init__(self):
        self._heap: list[list[int]] = []  # [count, actor]
        self._position: dict[int, int] = {}

    def _remove(self, actor: int) -> None:
        heap, position = self._heap, self._position
        i = position.pop(actor)
        while i:  # lift it to the top whatever its count: its ancestors each move down a level
            parent = (i - 1) >> 1
            heap[i] = heap[parent]
            position[heap[i][1]] = i
            i = parent
        last = heap.pop()
        n = len(heap)
        if not n:
            return
        # Sift the last entry down from the top, a child rising only if strictly smaller.
        i = 0
        count = last[0]
        while True:
            left = 2 * i + 1
            if left >= n:
                break
            low, low_count = i, count
            if heap[left][0] < low_count:
                low, low_count = left, heap[left][0]
            right = left + 1
            if right < n and heap[right][0] < low_count:
                low = right
            if low == i:
                break
            heap[i] = heap[low]
            position[heap[i][1]] = i
            i = low
        heap[i] = last
        position[last[1]] = i

    def set(self, actor: int, count: int) -> None:
        heap, position = self._heap, self._position
        if actor in position:
            self._remove(actor)
        entry = [count, actor]
        heap.append(entry)
        i = len(heap) - 1
        while i:  # climb past parents whose count is not smaller
            parent = (i - 1) >> 1
            if heap[parent][0] < count:
                break
            heap[i] = heap[parent]
            position[heap[i][1]] = i
            i = parent
        heap[i] = entry
        position[actor] = i

    def top(self) -> tuple[int, int]:
        count, actor = self._heap[0]
        return count, actor


def _split(rows: int, size: int) -> list[int]:
    """A block cut into blocks of `size` rows and the remainder (a non-strict repartition of one block)."""
    pieces = [size] * (rows // size)
    if rows % size:
        pieces.append(rows % size)
    return pieces


class _Stage:
    def __init__(self, timing: StageTiming, repartition_before: bool):
        self.timing = timing
        self.repartition_before = repartition_before
        self.overrun_s = 0.0
        self.ranking = _LeastLoaded()
        self.gathered_rows = 0  # rows of blocks not yet bundled
        self.bundles: deque[int] = deque()  # rows per bundle waiting for an actor
        self.received_rows = 0
        self.emitted_rows = 0

    def add_blocks(self, blocks: list[int]) -> None:
        size = self.timing.batch_rows
        for block in blocks:
            for piece in (_split(block, size) if self.repartition_before else (block,)):
                self.gathered_rows += piece
                self.received_rows += piece
                if self.gathered_rows >= size:
                    self.bundles.append(self.gathered_rows)
                    self.gathered_rows = 0

    def inputs_done(self) -> None:
        if self.gathered_rows:
            self.bundles.append(self.gathered_rows)
            self.gathered_rows = 0

    def task_seconds(self, rows: int) -> float:
        batches = -(-rows // self.timing.batch_rows)
        return batches * self.timing.batch_overhead_s + rows * self.timing.seconds_per_row + self.overrun_s


def simulate(order: list[str], actors: list[ActorSpec], timing: dict[str, StageTiming], rows: int, gpus: int,
             tasks_in_flight_per_actor: int = 2, source_block_rows: int = 100, *,
             overheads: RayOverheads = RayOverheads(), seed: int = 0,
             source_arrivals: list[tuple[float, int]] | None = None,
             trace: list[tuple[str, int, int | None, float, float, float]] | None = None) -> EventResult:
    """Run `rows` rows through the stages in `order`, served by `actors` (listed in pool start order).

    Returns the span from the first batch begun to the last batch ended, the throughput, and each GPU's
    busy share. `seed` draws the loop and task-start jitter; see `simulate_mean` to average it out.
    `source_arrivals`: (seconds, rows) of each source block, when the source is slower than the stages
    (None: every block of `source_block_rows` is there at the start). `trace`, if given, gets one
    (stage, actor, GPU, began, got the GPU, ended) per task, as the traced Ray runs record them.
    """
    if rows <= 0:
        raise ValueError("rows must be positive")
    if tasks_in_flight_per_actor < 1:
        raise ValueError("tasks_in_flight_per_actor must be at least 1")
    o = overheads
    rng = random.Random(seed)
    stages: list[_Stage] = []
    previous_batch = None
    for name in order:
        t = timing[name]
        if t.batch_rows < 1:
            raise ValueError(f"{name}: batch_rows must be at least 1")
        stages.append(_Stage(t, repartition_before=previous_batch is not None and t.batch_rows != previous_batch))
        previous_batch = t.batch_rows
    last_stage = len(stages) - 1
    index_of = {name: i for i, name in enumerate(order)}
    actor_stage: list[int] = []
    actor_gpu: list[int | None] = []
    for spec in actors:
        if spec.stage not in index_of:
            raise ValueError(f"actor for unknown stage {spec.stage!r}")
        if spec.gpu is not None and not 0 <= spec.gpu < gpus:
            raise ValueError(f"actor of {spec.stage} on GPU {spec.gpu}, but there are {gpus} GPUs")
        actor = len(actor_stage)
        actor_stage.append(index_of[spec.stage])
        actor_gpu.append(spec.gpu)
        stages[index_of[spec.stage]].ranking.set(actor, 0)
    missing = [name for name in order if name not in {spec.stage for spec in actors}]
    if missing:
        raise ValueError(f"no actors for {', '.join(missing)}")

    n_actors = len(actor_stage)
    in_flight = [0] * n_actors
    queued: list[deque[int]] = [deque() for _ in range(n_actors)]  # rows of tasks dispatched, not ended
    began_at = [0.0] * n_actors
    got_at = [0.0] * n_actors
    busy = [False] * n_actors
    gpu_free = [True] * gpus
    gpu_waiters: list[deque[int]] = [deque() for _ in range(gpus)]  # actors, first come first served
    gpu_held_s = [0.0] * gpus

    events: list[tuple] = []  # (time, tie-breaker, kind, payload)
    counter = 0

    def push(time: float, kind: int, payload) -> None:
        nonlocal counter
        counter += 1
        heapq.heappush(events, (time, counter, kind, payload))

    BEGIN, END, LOOP, SOURCE = 0, 1, 2, 3
    use_loop = o.loop_wait_s > 0
    for stage in stages:
        stage.overrun_s = o.hold_overrun_s
    on_time = [o.emit_on_time[min(len(stages) - 1 - i, len(o.emit_on_time) - 1)] for i in range(len(stages))]
    first_begin = math.inf
    last_end = 0.0
    running_tasks = 0  # dispatched and not ended: the loop's wait returns early when none is left
    noticed_later: list[tuple[int, int]] = []  # (actor, rows) ended since the last loop
    emit_at: dict[int, list[tuple[int, int]]] = {}  # loop number -> tasks whose outputs go out then
    arrive_at: dict[int, list[tuple[int, int]]] = {}  # loop number -> (stage, rows) out of a repartition
    loop_number = 0
    next_loop_at: float | None = None
    thread_free_at = 0.0  # when the loop's thread is back in `ray.wait`
    source_done = False

    # The source's blocks, cut to the first stage's batch.
    if source_arrivals is None:
        source_arrivals = [(0.0, min(source_block_rows, rows - start)) for start in range(0, rows, source_block_rows)]
    if sum(block for _, block in source_arrivals) != rows:
        raise ValueError("source_arrivals must add up to `rows`")
    for at, block in source_arrivals:
        push(at, SOURCE, _split(block, stages[0].timing.batch_rows))

    def take_next(actor: int, now: float) -> None:
        """Start the actor's next task, if it is free and has one."""
        if busy[actor] or not queued[actor]:
            return
        busy[actor] = True
        delay = o.task_start_s + (rng.expovariate(1 / o.task_start_jitter_s) if o.task_start_jitter_s > 0 else 0.0)
        push(now + delay, BEGIN, actor)

    def begin(actor: int, now: float) -> None:
        nonlocal first_begin
        task_rows = queued[actor][0]
        began_at[actor] = now
        if actor_stage[actor] == 0 and now < first_begin:
            first_begin = now
        gpu = actor_gpu[actor]
        if gpu is None:
            got_at[actor] = now
            push(now + stages[actor_stage[actor]].task_seconds(task_rows), END, actor)
        elif gpu_free[gpu]:
            gpu_free[gpu] = False
            hold(actor, gpu, now)
        else:
            gpu_waiters[gpu].append(actor)

    def hold(actor: int, gpu: int, now: float) -> None:
        seconds = stages[actor_stage[actor]].task_seconds(queued[actor][0])
        got_at[actor] = now
        gpu_held_s[gpu] += seconds
        push(now + seconds, END, actor)

    def end(actor: int, now: float) -> None:
        nonlocal last_end, running_tasks
        task_rows = queued[actor].popleft()
        gpu = actor_gpu[actor]
        if trace is not None:
            trace.append((order[actor_stage[actor]], actor, gpu, began_at[actor], got_at[actor], now))
        if gpu is not None:
            if gpu_waiters[gpu]:
                hold(gpu_waiters[gpu].popleft(), gpu, now + o.gpu_handover_s)
            else:
                gpu_free[gpu] = True
        if actor_stage[actor] == last_stage and now > last_end:
            last_end = now
        running_tasks -= 1
        busy[actor] = False
        take_next(actor, now)
        if use_loop:
            noticed_later.append((actor, task_rows))
            if running_tasks == 0 and source_done:
                schedule_loop(max(now, thread_free_at))  # the wait returns once everything it waits on is done
        else:
            emit([(actor, task_rows)], now)
            dispatch(now)

    def emit(finished: list[tuple[int, int]], now: float) -> None:
        for actor, task_rows in finished:
            stage_index = actor_stage[actor]
            stage = stages[stage_index]
            in_flight[actor] -= 1
            stage.ranking.set(actor, in_flight[actor])
            stage.emitted_rows += task_rows
            if stage_index == last_stage:
                continue
            following = stages[stage_index + 1]
            if following.repartition_before and use_loop:
                # The repartition is an operator of its own: dispatched now, noticed on the next loop.
                arrive_at.setdefault(loop_number + 1 + pick_delay(stage_index), []).append((stage_index + 1, task_rows))
            else:
                arrive(stage_index + 1, task_rows)

    def arrive(stage_index: int, task_rows: int) -> None:
        stage = stages[stage_index]
        stage.add_blocks(_split(task_rows, stages[stage_index - 1].timing.batch_rows))
        if stage.received_rows == rows:
            stage.inputs_done()

    def pick_delay(stage_index: int) -> int:
        if rng.random() < on_time[stage_index]:
            return 0
        return 2 if rng.random() < o.two_loops_late else 1

    def dispatch(now: float) -> float:
        """Hand out bundles; returns when the loop's thread is done dispatching."""
        nonlocal running_tasks
        for stage in stages:
            bundles, ranking = stage.bundles, stage.ranking
            while bundles:
                count, actor = ranking.top()
                if count >= tasks_in_flight_per_actor:
                    break
                in_flight[actor] = count + 1
                ranking.set(actor, count + 1)
                queued[actor].append(bundles.popleft())
                running_tasks += 1
                now += o.dispatch_s
                take_next(actor, now)
        return now

    def schedule_loop(at: float) -> None:
        nonlocal next_loop_at
        if next_loop_at is None or at < next_loop_at - 1e-12:
            next_loop_at = at
            push(at, LOOP, at)

    def run_loop(now: float) -> None:
        nonlocal next_loop_at, loop_number, thread_free_at
        next_loop_at = None
        for actor, task_rows in noticed_later:
            emit_at.setdefault(loop_number + pick_delay(actor_stage[actor]), []).append((actor, task_rows))
        noticed_later.clear()
        emit(emit_at.pop(loop_number, []), now)
        for stage_index, task_rows in arrive_at.pop(loop_number, []):
            arrive(stage_index, task_rows)
        thread_free_at = dispatch(now) + (rng.uniform(0, 2 * o.loop_work_s) if o.loop_work_s > 0 else 0.0)
        loop_number += 1
        if stages[last_stage].emitted_rows < rows:
            schedule_loop(thread_free_at + o.loop_wait_s)

    if use_loop:
        schedule_loop(0.0)
    while events and stages[last_stage].emitted_rows < rows:
        now, _, kind, payload = heapq.heappop(events)
        if kind == END:
            end(payload, now)
        elif kind == BEGIN:
            begin(payload, now)
        elif kind == LOOP:
            if payload == next_loop_at:
                run_loop(now)
        else:
            stages[0].add_blocks(payload)
            if stages[0].received_rows == rows:
                stages[0].inputs_done()
                source_done = True
            if not use_loop:
                dispatch(now)
    if stages[last_stage].emitted_rows < rows:
        raise RuntimeError("the model stalled before every row reached the last stage")
    span = last_end - first_begin
    return EventResult(rows=rows, span_s=span, throughput=rows / span, gpu_busy=[held / span for held in gpu_held_s])


def simulate_mean(order: list[str], actors: list[ActorSpec], timing: dict[str, StageTiming], rows: int, gpus: int,
                  tasks_in_flight_per_actor: int = 2, source_block_rows: int = 100, *,
                  overheads: RayOverheads = RayOverheads(), repeats: int = 5, shuffle_pools: bool = True,
                  source_arrivals: list[tuple[float, int]] | None = None) -> EventResult:
    """`simulate` averaged over `repeats` seeds, each (with `shuffle_pools`) with every pool's actors in a
    different order.

    Layouts that share GPUs lock into loop-aligned rhythms that a few milliseconds of jitter change, and the
    order in which a pool's actors come up decides which of them win ties, so which GPUs get the work:
    one run can be several percent (on 16 GPUs, ten) off the mean, in Ray as in the model.
    """
    results = []
    for seed in range(repeats):
        ordered = actors
        if shuffle_pools:
            rng = random.Random(seed)
            ordered = []
            for name in order:
                pool = [spec for spec in actors if spec.stage == name]
                rng.shuffle(pool)
                ordered += pool
        results.append(simulate(order, ordered, timing, rows, gpus, tasks_in_flight_per_actor, source_block_rows,
                                overheads=overheads, seed=seed, source_arrivals=source_arrivals))
    span = sum(r.span_s for r in results) / repeats
    return EventResult(rows=rows, span_s=span, throughput=sum(r.throughput for r in results) / repeats,
                       gpu_busy=[sum(r.gpu_busy[g] for r in results) / repeats for g in range(gpus)])


# ---------------------------------------------------------------- layouts


def placed_actors(order: list[str], placements: dict[str, tuple[int, float]], gpus: int) -> list[ActorSpec]:
    """Where Ray puts each pool's actors, given (replicas, num_gpus) per stage: pools start in stage order,
    a fractional actor goes to the GPU with the least room that still fits it (the lowest index on ties),
    a whole-GPU actor to the first empty GPU. This is what the traced runs showed."""
    free = [1.0] * gpus
    specs: list[ActorSpec] = []
    for name in order:
        replicas, share = placements[name]
        if share > 1 + 1e-9:
            raise ValueError(f"{name}: actors spanning several GPUs are not modelled")
        for _ in range(replicas):
            if share <= 0:
                specs.append(ActorSpec(name, None))
                continue
            fits = [(room, gpu) for gpu, room in enumerate(free) if room >= share - 1e-9]
            if not fits:
                raise ValueError(f"{name}: an actor asking for {share:g} GPU does not fit on {gpus} GPUs")
            _, gpu = min(fits)
            free[gpu] -= share
            specs.append(ActorSpec(name, gpu))
    return specs


def colocated_actors(order: list[str], gpus: int) -> list[ActorSpec]:
    """Every GPU hosts one actor of every stage (pools start in stage order, a pool's actor i on GPU i)."""
    return [ActorSpec(name, gpu) for name in order for gpu in range(gpus)]


def data_parallel(order: list[str], timing: dict[str, StageTiming], gpus: int,
                  batch_rows: int) -> tuple[list[str], list[ActorSpec], dict[str, StageTiming]]:
    """One actor per GPU runs every stage on its batch: one stage whose costs are the sum of all."""
    merged = StageTiming(batch_overhead_s=sum(timing[n].batch_overhead_s for n in order),
                         seconds_per_row=sum(timing[n].seconds_per_row for n in order), batch_rows=batch_rows)
    return ["all"], [ActorSpec("all", gpu) for gpu in range(gpus)], {"all": merged}


def dedicated_actors(order: list[str], timing: dict[str, StageTiming], gpus: int,
                     tasks_in_flight_per_actor: int = 2, overheads: RayOverheads = RayOverheads(),
                     small_share: float = 0.5) -> list[ActorSpec]:
    """Whole GPUs per stage, counts proportional to cost; stages needing under `small_share` of a GPU
    share GPUs of their own.

    Every stage gets enough actors that the executor loop does not cap it: an actor whose batches are short
    next to a hand-off round trip (up to about three loops) finishes `tasks_in_flight_per_actor` per round
    trip.
    """
    cost = {n: timing[n].seconds_per_row + timing[n].batch_overhead_s / timing[n].batch_rows for n in order}
    total = sum(cost.values())
    need = {n: gpus * cost[n] / total for n in order}
    small = [n for n in order if need[n] < small_share]
    large = [n for n in order if n not in small]
    shared = max(1, math.ceil(sum(need[n] for n in small) - 1e-9)) if small else 0
    spread = gpus - shared
    if len(large) > spread:
        raise ValueError(f"{len(large)} stages need a GPU each but only {spread} are left")
    scale = spread / sum(need[n] for n in large)
    counts = {n: max(1, math.floor(need[n] * scale)) for n in large}
    while sum(counts.values()) < spread:  # largest remainder: the stage that would be busiest per GPU
        counts[max(large, key=lambda n: need[n] / counts[n])] += 1
    while sum(counts.values()) > spread:
        counts[min((n for n in large if counts[n] > 1), key=lambda n: need[n] / counts[n])] -= 1
    rate = gpus / total
    # Loops stretch with the dispatches they make (a thread saturated by them has no steady loop at all),
    # and a slot's hand-off round trip takes up to about three of them.
    dispatches_per_s = rate * sum(1 / timing[n].batch_rows for n in order)
    busy_share = min(0.5, overheads.dispatch_s * dispatches_per_s)  # past that, more actors cannot help
    loop = overheads.loop_s() / (1 - busy_share)
    round_trip = 3 * loop + overheads.task_start_s + overheads.task_start_jitter_s

    def per_actor(n: str) -> tuple[float, float]:
        """Rows/s of one actor alone on a GPU, and of one capped by the loop's hand-off round trip."""
        t = timing[n]
        batch_s = t.batch_overhead_s + t.batch_rows * t.seconds_per_row
        alone = t.batch_rows / batch_s if batch_s > 0 else math.inf
        # Busy all the time if its other tasks cover a round trip, else idle for part of each one.
        return alone, min(alone, tasks_in_flight_per_actor * t.batch_rows / (batch_s + round_trip))

    specs: list[ActorSpec] = []
    first_gpu = 0
    for n in large:  # several actors per GPU where one could not keep its GPU busy through the hand-offs
        alone, capped = per_actor(n)
        per_gpu = max(1, math.ceil(alone / capped - 1e-9))
        specs += [ActorSpec(n, first_gpu + i % counts[n]) for i in range(counts[n] * per_gpu)]
        first_gpu += counts[n]
    for k, n in enumerate(small):
        replicas = max(1, math.ceil(rate / per_actor(n)[1]))
        specs += [ActorSpec(n, first_gpu + (k + i) % shared) for i in range(replicas)]
    position = {n: i for i, n in enumerate(order)}
    return sorted(specs, key=lambda spec: position[spec.stage])


DALLE2_IMAGE_COSTS = {"text_encoder": 0.0004, "prior": 0.1662, "decoder": 0.4487, "reranker": 0.0026,
                      "upsampler_256": 0.0775, "upsampler_1024": 0.2954}
"""GPU-seconds per image of the `dalle2` profile, as docs/BENCHMARKS.md lists them."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.event_model", description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--batch-rows", type=int, default=4)
    parser.add_argument("--prompts-per-8-gpus", type=int, default=2000)
    parser.add_argument("--dispatch-s", type=float, default=RayOverheads().dispatch_s,
                        help="seconds of the executor loop per task dispatched")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    overheads = replace(RayOverheads(), dispatch_s=args.dispatch_s)
    order = list(DALLE2_IMAGE_COSTS)
    timing = {n: StageTiming(0.0, cost, args.batch_rows) for n, cost in DALLE2_IMAGE_COSTS.items()}
    print(f"{'GPUs':>5s} {'prompts':>8s} {'layout':13s} {'actors':>6s} {'efficiency':>10s} {'span s':>8s} "
          f"{'busy min':>8s} {'model s':>7s}")
    for gpus in args.gpus:
        rows = args.prompts_per_8_gpus * gpus // 8
        dp_order, dp_actors, dp_timing = data_parallel(order, timing, gpus, args.batch_rows)
        layouts = {"colocated": (order, colocated_actors(order, gpus), timing),
                   "dedicated": (order, dedicated_actors(order, timing, gpus, overheads=overheads), timing),
                   "data_parallel": (dp_order, dp_actors, dp_timing)}
        for name, (stage_order, actors, stage_timing) in layouts.items():
            began = time.perf_counter()
            result = simulate_mean(stage_order, actors, stage_timing, rows, gpus, overheads=overheads,
                                   repeats=args.repeats)
            took = time.perf_counter() - began
            print(f"{gpus:5d} {rows:8d} {name:13s} {len(actors):6d} "
                  f"{efficiency(result, stage_order, stage_timing, gpus):10.4f} {result.span_s:8.1f} "
                  f"{min(result.gpu_busy):8.3f} {took:7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
