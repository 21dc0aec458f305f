"""In-process runs of the stage actors, without Ray: calibration, benchmarks and tests use the pure path."""

from __future__ import annotations

import numpy as np

from actors.base import StageContext
from pipeline import images as source_images
from pipeline.config import INTERPOLATION_COLUMNS, Config


def prompt_batch(prompts: list[str], seeds) -> dict[str, np.ndarray]:
    """Pipeline rows as the reader makes them, for prompts with given candidate seeds (rows x candidates)."""
    n = len(prompts)
    return {"id": np.array([f"row{i}" for i in range(n)], dtype=object), "prompt": np.array(prompts, dtype=object),
            "status": np.array(["ok"] * n, dtype=object), "error": np.array([""] * n, dtype=object),
            "truncated": np.zeros(n, dtype=bool), "seeds": np.asarray(seeds, dtype=np.int64).reshape(n, -1)}


def image_batch(images: list, seeds, prompts: list[str] | None = None, **columns) -> dict[str, np.ndarray]:
    """Image-mode rows as the reader makes them: each row's image value (bytes, a path, or None) in `image`;
    `image_a` and `image_b` (interpolation) the same way; any other column as given."""
    batch = prompt_batch(prompts if prompts is not None else [""] * len(images), seeds)
    for name, values in {"image": images, **columns}.items():
        if name in ("image", *INTERPOLATION_COLUMNS):
            batch[name], batch[source_images.kind_column(name)] = source_images.carried(values)
        else:
            column = np.empty(len(values), dtype=object)
            for i, value in enumerate(values):
                column[i] = value
            batch[name] = column
    return batch


def run_stages(config: Config, batch: dict[str, np.ndarray], *, stop_after: str | None = None,
               use_gpu: bool = False, actors: dict | None = None, has_prompts: bool = True) -> dict[str, np.ndarray]:
    """Each stage actor in order on one batch, in this process. `actors` caches them across calls."""
    from pipeline.plan import stage_specs

    actors = {} if actors is None else actors
    for spec in stage_specs(config, has_prompts):
        if spec.name not in actors:
            actors[spec.name] = spec.actor_class()(StageContext(config=config, use_gpu=use_gpu,
                                                                final_image=spec.final_image, options=spec.options))
        batch = actors[spec.name](batch)
        if spec.name == stop_after:
            break
    return batch
