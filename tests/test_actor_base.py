"""Shared stage-actor machinery: a forward pass that runs out of GPU memory is split, with the same images."""

from __future__ import annotations

import numpy as np
import torch

from actors.base import StageContext
from actors.decoder import DecoderActor
from benchmarks.local import prompt_batch
from pipeline.config import load_config
from pipeline.writer import OOM_PREFIX
from tests.conftest import FAST_STEPS, model_overrides


class DecoderOnSmallGpu(DecoderActor):
    """The real decoder, on a GPU that holds at most 2 images per forward pass (a fault injected around
    run(); the model itself is untouched)."""

    passes: list[int]

    def run(self, inputs, generators):
        images = len(generators)
        self.passes.append(images)
        if images > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return super().run(inputs, generators)


def test_out_of_memory_halves_the_pass_and_gives_the_same_images(tiny_models):
    config = load_config(None, FAST_STEPS + model_overrides(tiny_models, upsampler_1024=False, clip=False)
                         + ["stages.decoder.batch_size=6"], input_path="in", output_path="out")
    batch = prompt_batch(["a red fox", "a blue bird", "a green frog"], np.arange(6).reshape(3, 2))
    from actors.prior import PriorActor
    from actors.text_encoder import TextEncoderActor

    for actor_class in (TextEncoderActor, PriorActor):
        batch = actor_class(StageContext(config=config))(batch)
    plain = DecoderActor(StageContext(config=config))(dict(batch))
    DecoderOnSmallGpu.passes = []
    small = DecoderOnSmallGpu(StageContext(config=config))
    split = small(dict(batch))
    # 6 images: 6 fails -> 3 fails -> 2 + 1, and again for the other half; then it stays at 2 per pass.
    assert DecoderOnSmallGpu.passes == [6, 3, 2, 1, 3, 2, 1]
    assert int(split[OOM_PREFIX + "decoder"].sum()) == 3 and small.batch_images == 2
    np.testing.assert_allclose(split["image_64"], plain["image_64"], atol=1e-3)  # batch-dependent float summation only
    assert list(split["status"]) == ["ok"] * 3
    again = small(dict(batch))
    assert DecoderOnSmallGpu.passes[7:] == [2, 2, 2], "later batches start at the size that fitted"
    assert int(again[OOM_PREFIX + "decoder"].sum()) == 0
    np.testing.assert_allclose(again["image_64"], plain["image_64"], atol=1e-3)  # batch-dependent float summation only
