"""Several stages in one actor: each batch goes through every stage in order, in one process."""

from __future__ import annotations

import numpy as np

from actors.base import StageActor, StageContext


class FusedStages:
    """The stages a GPU hosts, run one after another in this actor (run.fuse_stages).

    One process and one CUDA context per GPU instead of one per stage, and no hand-off through the object store
    between stages. Each stage still makes its own forward passes of its own batch size, so the images do not
    depend on the fusing."""

    def __init__(self, stages: list[tuple[type[StageActor], StageContext]]):
        self.stages = [actor_class(context) for actor_class, context in stages]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for stage in self.stages:
            batch = stage(batch)
        return batch
