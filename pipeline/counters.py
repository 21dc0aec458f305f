"""Per-row stage counters: the columns each stage actor adds to a batch, and how writers and the driver fold them."""

from __future__ import annotations

import numpy as np

IMAGES_PREFIX = "_images_"
SECONDS_PREFIX = "_seconds_"
BEGIN_PREFIX = "_begin_"
END_PREFIX = "_end_"
OOM_PREFIX = "_oom_halvings_"
"""Per-row counters each stage adds: images it processed for the row, busy seconds attributed to it, when
the batch holding the row began and ended, and forward passes that ran out of GPU memory and were split.
Writers and the driver fold them (sum, sum, min, max, sum), so the run report counts committed work only."""
_FOLD = {IMAGES_PREFIX: np.sum, SECONDS_PREFIX: np.sum, BEGIN_PREFIX: np.min, END_PREFIX: np.max, OOM_PREFIX: np.sum}


def merge_stage_counters(totals: dict[str, float], batch: dict) -> dict[str, float]:
    """Fold a batch's stage counters into running totals (sums, earliest begin, latest end)."""
    for column, values in batch.items():
        for prefix, fold in _FOLD.items():
            if column.startswith(prefix):
                value = float(fold(np.asarray(values)))
                totals[column] = value if column not in totals else float(fold([totals[column], value]))
    return totals
