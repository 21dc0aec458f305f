"""The driver's end of a Ray Data stream: each output block as a numpy batch, and a shutdown that waits."""

from __future__ import annotations

import collections
import threading

EXECUTION_STOP_WAIT_S = 60.0
"""How long `close` waits for Ray Data's scheduling thread to stop."""

BLOCK_STATS_KEPT = 256
"""Per operator, how many of the latest blocks' statistics the driver keeps for `Dataset.stats()`."""


class OutputStream:
    """A dataset's output blocks as numpy batches (a dict of columns per block), fetched in this process; empty
    blocks (which may have no columns) are skipped.

    Not `Dataset.iter_batches`: its iterator sends the dataset's whole execution statistics, which grow by
    about 1 KB per block of every operator, to Ray Data's stats actor every 5 seconds. Each copy over 100 KB
    goes through the object store, and the driver's RSS kept the store pages those copies touched: 348 MB
    after 10M rows, most of what the driver grew by over a long run. A run's output blocks are a few
    counters each, so fetching them directly loses nothing (Ray Data's executor still reports its own
    operator metrics; only the iterator's `data_iter_*` metrics, which describe a training loop's waits, are
    not sent).

    Ray Data's operators also keep every output block's statistics in the driver for `Dataset.stats()`
    until the run ends (each block's execution statistics as unpickled objects: about 1 KB of Python objects
    per block of each operator, and in a probe 4 KB of the driver's RSS per block through four operators),
    which over millions of small batches would be gigabytes. The stream keeps the latest `BLOCK_STATS_KEPT`
    per operator, so `Dataset.stats()` describes the run's last blocks rather than all of them.

    `close` (or leaving the `with` block) shuts the streaming execution down, which lets go of every stage's
    actor pool, and waits for the scheduling thread: a step still running could otherwise start replacement
    actors into pools already shut down.
    """

    def __init__(self, dataset):
        self._dataset = dataset
        self._executor = None

    def __iter__(self):
        import ray
        from ray.data.block import BlockAccessor

        # A private method (Ray is pinned): the public iter_internal_ref_bundles streams the same bundles but
        # keeps the executor to itself, and `close` needs it. The first bundle is computed before this returns.
        bundles, _, self._executor = self._dataset._execute_to_iterator()
        _bound_block_stats(self._executor)
        for bundle in bundles:
            for block in bundle.blocks:
                accessor = BlockAccessor.for_block(ray.get(block.ref))
                if accessor.num_rows():
                    yield accessor.to_numpy()

    def close(self) -> None:
        executor = self._executor
        if executor is None:  # failed before its first output: Ray Data shut it down when it raised
            return
        executor.shutdown(force=True)
        if isinstance(executor, threading.Thread) and executor.is_alive():
            executor.join(EXECUTION_STOP_WAIT_S)

    def __enter__(self) -> "OutputStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _bound_block_stats(executor) -> None:
    """Make each operator keep only its latest blocks' statistics (private attributes; Ray is pinned). The
    operators append to `_output_blocks_stats` and only iterate it when they summarise, so a bounded deque
    stands in for the list."""
    for operator in executor._topology:
        kept = getattr(operator, "_output_blocks_stats", None)
        if isinstance(kept, list):
            operator._output_blocks_stats = collections.deque(kept, maxlen=BLOCK_STATS_KEPT)
