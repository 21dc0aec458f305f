"""The driver's end of a Ray Data stream: every block once, no statistics shipped per block, a shutdown that frees."""

from __future__ import annotations

import time

import numpy as np

from pipeline.stream import OutputStream


class AddOne:
    """An actor stage, so the stream holds an actor pool that `close` has to let go of."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds

    def __call__(self, batch):
        time.sleep(self.seconds)
        return {"id": batch["id"] + 1}


def actor_dataset(ray, blocks: int, seconds_per_block: float = 0.0):
    return ray.data.range(blocks * 3, override_num_blocks=blocks).map_batches(
        AddOne, batch_size=None, fn_constructor_args=(seconds_per_block,),
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)


def test_the_stream_yields_every_block_once_as_numpy_columns(ray_session):
    with OutputStream(actor_dataset(ray_session, 4)) as stream:
        batches = list(stream)
    assert all(isinstance(b["id"], np.ndarray) for b in batches)
    assert sorted(np.concatenate([b["id"] for b in batches]).tolist()) == list(range(1, 13))


def test_the_stream_skips_empty_blocks(ray_session):
    """A stage may return nothing for a batch (every row done already): such blocks carry no columns."""
    dataset = actor_dataset(ray_session, 4).map_batches(lambda batch: {} if batch["id"][0] > 3 else batch,
                                                        batch_size=None)
    with OutputStream(dataset) as stream:
        assert [b["id"].tolist() for b in stream] == [[1, 2, 3]]


def test_the_stream_does_not_ship_ray_datas_statistics_from_the_driver(ray_session, monkeypatch):
    """`Dataset.iter_batches` sends the whole (per-block) execution statistics to Ray Data's stats actor as it
    goes; over a long run those copies filled the driver's RSS with object-store pages. The stream sends none."""
    from ray.data._internal import stats

    sent = []
    monkeypatch.setattr(stats._StatsManager, "update_iteration_metrics",
                        staticmethod(lambda *args, **kwargs: sent.append(args)))
    for _ in actor_dataset(ray_session, 3).iter_batches(batch_size=None):
        pass
    assert sent, "control: Ray Data's own iterator no longer ships statistics; this test checks nothing"

    sent.clear()
    with OutputStream(actor_dataset(ray_session, 3)) as stream:
        assert sum(len(b["id"]) for b in stream) == 9
    assert sent == []


def test_closing_the_stream_early_frees_its_actor_pool(ray_session):
    free_before = ray_session.available_resources().get("CPU", 0)
    stream = OutputStream(actor_dataset(ray_session, 600, seconds_per_block=0.1))  # a minute of work
    batches = iter(stream)  # held to the end, as a caller that stops early holds it: no garbage collection frees it
    next(batches)
    stream.close()
    deadline = time.time() + 20
    while ray_session.available_resources().get("CPU", 0) < free_before and time.time() < deadline:
        time.sleep(0.2)
    assert ray_session.available_resources().get("CPU", 0) >= free_before


def test_the_stream_keeps_only_the_latest_block_statistics(ray_session, monkeypatch):
    """Ray Data keeps every output block's statistics in the driver until the run ends (about 1 KB of Python
    objects per block of each operator); the stream keeps a bounded number per operator, and the run's
    statistics still summarise."""
    from pipeline import stream as stream_module

    monkeypatch.setattr(stream_module, "BLOCK_STATS_KEPT", 3)
    with OutputStream(actor_dataset(ray_session, 12)) as stream:
        assert sum(len(b["id"]) for b in stream) == 36
        kept = {op.name: len(op._output_blocks_stats) for op in stream._executor._topology
                if hasattr(op, "_output_blocks_stats")}
    assert kept and max(kept.values()) == 3, kept
    assert "MapBatches(AddOne)" in stream._executor.get_stats().to_summary().to_string()
