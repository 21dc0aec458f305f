"""The event model of the actor-pool chain: analytic cases, GPU sharing, bottlenecks and the executor loop."""

from __future__ import annotations

from dataclasses import replace

import pytest

from benchmarks.event_model import (NO_OVERHEADS, ActorSpec, RayOverheads, StageTiming, _LeastLoaded,
                                    bound_rows_per_s, colocated_actors, data_parallel, dedicated_actors,
                                    efficiency, placed_actors, simulate, simulate_mean)


def test_one_stage_one_gpu_runs_its_batches_back_to_back():
    timing = {"only": StageTiming(batch_overhead_s=0.1, seconds_per_row=0.05, batch_rows=4)}
    result = simulate(["only"], [ActorSpec("only", 0)], timing, rows=100, gpus=1, overheads=NO_OVERHEADS)
    assert result.span_s == pytest.approx(25 * (0.1 + 4 * 0.05))
    assert result.throughput == pytest.approx(100 / 7.5)
    assert result.gpu_busy == [pytest.approx(1.0)]


def test_a_short_last_batch_costs_its_own_rows():
    timing = {"only": StageTiming(batch_overhead_s=0.5, seconds_per_row=1.0, batch_rows=4)}
    result = simulate(["only"], [ActorSpec("only", 0)], timing, rows=10, gpus=1, overheads=NO_OVERHEADS)
    assert result.span_s == pytest.approx(3 * 0.5 + 10 * 1.0)


def test_with_the_executor_loop_a_long_batch_stage_only_pays_the_task_start_gaps():
    timing = {"only": StageTiming(batch_overhead_s=1.0, seconds_per_row=0.05, batch_rows=4)}
    result = simulate(["only"], [ActorSpec("only", 0)], timing, rows=100, gpus=1)
    gaps = 24 * (RayOverheads().task_start_s + RayOverheads().task_start_jitter_s)
    assert result.span_s == pytest.approx(25 * 1.2 + gaps, rel=0.01)


def test_two_actors_sharing_a_gpu_take_turns():
    timing = {"only": StageTiming(0.0, 0.25, batch_rows=4)}  # one second per batch
    shared = simulate(["only"], [ActorSpec("only", 0), ActorSpec("only", 0)], timing, rows=40, gpus=1,
                      overheads=NO_OVERHEADS)
    apart = simulate(["only"], [ActorSpec("only", 0), ActorSpec("only", 1)], timing, rows=40, gpus=2,
                     overheads=NO_OVERHEADS)
    assert shared.span_s == pytest.approx(10.0)
    assert shared.gpu_busy == [pytest.approx(1.0)]
    assert apart.span_s == pytest.approx(5.0)


def test_an_actor_without_a_gpu_never_waits_for_one():
    timing = {"only": StageTiming(0.0, 0.25, batch_rows=4)}
    result = simulate(["only"], [ActorSpec("only", None), ActorSpec("only", None)], timing, rows=40, gpus=1,
                      overheads=NO_OVERHEADS)
    assert result.span_s == pytest.approx(5.0)
    assert result.gpu_busy == [0.0]


def test_the_slowest_stage_sets_the_throughput():
    order = ["fast", "slow"]
    timing = {"fast": StageTiming(0.0, 0.1, 4), "slow": StageTiming(0.0, 0.3, 4)}
    actors = [ActorSpec("fast", 0), ActorSpec("slow", 1)]
    result = simulate(order, actors, timing, rows=400, gpus=2, overheads=NO_OVERHEADS)
    # Fill (the first fast batch), then the slow stage back to back.
    assert result.span_s == pytest.approx(0.4 + 100 * 1.2)
    assert efficiency(result, order, timing, gpus=2) == pytest.approx((400 / 120.4) / (2 / 0.4))


def test_a_repartition_between_stages_rebundles_rows_to_the_next_batch():
    order = ["small", "large"]
    timing = {"small": StageTiming(0.0, 0.01, 2), "large": StageTiming(1.0, 0.0, 8)}
    actors = [ActorSpec("small", 0), ActorSpec("large", 1)]
    result = simulate(order, actors, timing, rows=64, gpus=2, overheads=NO_OVERHEADS)
    # 8 large batches of one second each: the large stage runs 8 tasks, not 32.
    assert 8.0 < result.span_s < 8.2


def test_ties_go_to_the_actor_updated_last():
    ranking = _LeastLoaded()
    for actor in range(4):
        ranking.set(actor, 0)
    assert ranking.top() == (0, 3)
    ranking.set(3, 1)
    ranking.set(1, 1)
    ranking.set(1, 0)
    assert ranking.top() == (0, 1)
    for actor in (0, 1, 2):
        ranking.set(actor, 2)
    assert ranking.top() == (1, 3)


def test_the_executor_loop_caps_a_single_actor_with_short_batches():
    timing = {"only": StageTiming(0.0, 0.001, 4)}
    ideal = simulate(["only"], [ActorSpec("only", 0)], timing, rows=400, gpus=1, overheads=NO_OVERHEADS)
    looped = simulate_mean(["only"], [ActorSpec("only", 0)], timing, rows=400, gpus=1, repeats=3)
    loop = RayOverheads().loop_s()
    assert ideal.span_s == pytest.approx(0.4)
    # Two tasks in flight, each replaced about a loop after it ends (noticed half a loop later on average,
    # emitted 0 to 2 loops after that): 100 batches take ~50 round trips of 0.5 to 3 loops.
    assert 50 * 0.5 * loop < looped.span_s < 50 * 3 * loop


def test_colocated_layout_with_balanced_costs_keeps_eight_gpus_busy():
    order = [f"stage{i}" for i in range(6)]
    timing = {name: StageTiming(0.0, 0.1, 4) for name in order}
    result = simulate(order, colocated_actors(order, 8), timing, rows=2000, gpus=8)
    assert efficiency(result, order, timing, 8) > 0.95
    assert min(result.gpu_busy) > 0.9


def test_colocated_beats_a_single_small_actor_on_a_busy_gpu():
    # The front stage is tiny: alone on a GPU shared with a slow stage it waits behind every slow batch.
    order = ["tiny", "slow"]
    timing = {"tiny": StageTiming(0.0, 0.001, 4), "slow": StageTiming(0.0, 0.25, 4)}
    cramped = [ActorSpec("tiny", 0), ActorSpec("slow", 0), ActorSpec("slow", 0), ActorSpec("slow", 1)]
    result = simulate(order, cramped, timing, rows=400, gpus=2)
    spread = simulate(order, colocated_actors(order, 2), timing, rows=400, gpus=2)
    assert spread.throughput > 1.3 * result.throughput


def test_data_parallel_merges_the_stages_and_reaches_the_bound_on_a_long_run():
    order = ["a", "b"]
    timing = {"a": StageTiming(0.0, 0.1, 4), "b": StageTiming(0.0, 0.3, 4)}
    dp_order, dp_actors, dp_timing = data_parallel(order, timing, gpus=4, batch_rows=4)
    assert dp_timing["all"].seconds_per_row == pytest.approx(0.4)
    result = simulate(dp_order, dp_actors, dp_timing, rows=1600, gpus=4)
    assert bound_rows_per_s(dp_order, dp_timing, 4) == pytest.approx(bound_rows_per_s(order, timing, 4))
    assert efficiency(result, dp_order, dp_timing, 4) > 0.97


def test_dedicated_layout_uses_every_gpu_and_gives_big_stages_more():
    order = ["tiny", "big", "medium"]
    timing = {"tiny": StageTiming(0.0, 0.001, 4), "big": StageTiming(0.0, 0.6, 4), "medium": StageTiming(0.0, 0.3, 4)}
    actors = dedicated_actors(order, timing, gpus=16)
    gpus_of = {name: {a.gpu for a in actors if a.stage == name} for name in order}
    assert set().union(*gpus_of.values()) == set(range(16))
    assert len(gpus_of["big"]) == 2 * len(gpus_of["medium"])
    assert [a.stage for a in actors] == sorted((a.stage for a in actors), key=order.index)


def test_bad_layouts_are_refused():
    timing = {"a": StageTiming(0.0, 0.1, 4), "b": StageTiming(0.0, 0.1, 4)}
    with pytest.raises(ValueError, match="no actors for b"):
        simulate(["a", "b"], [ActorSpec("a", 0)], timing, rows=10, gpus=1)
    with pytest.raises(ValueError, match="GPU 3"):
        simulate(["a", "b"], [ActorSpec("a", 0), ActorSpec("b", 3)], timing, rows=10, gpus=2)


def test_the_same_seed_gives_the_same_run():
    order = ["a", "b"]
    timing = {"a": StageTiming(0.0, 0.01, 4), "b": StageTiming(0.0, 0.05, 4)}
    actors = [ActorSpec("a", 0), ActorSpec("b", 0), ActorSpec("b", 1)]
    first = simulate(order, actors, timing, rows=200, gpus=2, seed=3)
    assert simulate(order, actors, timing, rows=200, gpus=2, seed=3) == first


def test_the_executor_thread_caps_dispatches_per_second():
    # Twenty actors on twenty GPUs could do 2000 batches a second; a 10 ms dispatch allows at most 100.
    timing = {"only": StageTiming(0.0, 0.0025, 4)}
    actors = [ActorSpec("only", gpu) for gpu in range(20)]
    slow = replace(RayOverheads(), dispatch_s=0.01)
    result = simulate(["only"], actors, timing, rows=4000, gpus=20, overheads=slow)
    assert result.span_s > 1000 * 0.01
    assert result.throughput < 100 * 4


def test_placed_actors_reproduce_rays_best_fit_of_the_8_gpu_plan():
    # The planner's dalle2 plan on 8 GPUs (replicas, num_gpus), and where the traced Ray run put each actor.
    order = ["text_encoder", "prior", "decoder", "reranker", "upsampler_256", "upsampler_1024"]
    plan = {"text_encoder": (1, 0.004), "prior": (3, 0.432), "decoder": (7, 0.5), "reranker": (1, 0.021),
            "upsampler_256": (1, 0.605), "upsampler_1024": (7, 0.33)}
    gpus_of = {}
    for spec in placed_actors(order, plan, 8):
        gpus_of.setdefault(spec.stage, []).append(spec.gpu)
    assert gpus_of == {"text_encoder": [0], "prior": [0, 0, 1], "decoder": [1, 2, 2, 3, 3, 4, 4], "reranker": [1],
                       "upsampler_256": [5], "upsampler_1024": [5, 6, 6, 6, 7, 7, 7]}
    with pytest.raises(ValueError, match="does not fit"):
        placed_actors(order, {**plan, "upsampler_256": (2, 0.605)}, 8)
