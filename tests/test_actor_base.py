"""Shared stage-actor machinery: a forward pass that runs out of GPU memory is split, with the same images."""

from __future__ import annotations

import numpy as np
import torch

from actors.base import StageContext
from actors.decoder import DecoderActor
from benchmarks.local import prompt_batch
from pipeline.config import load_config
from pipeline.counters import OOM_PREFIX
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


def stages_up_to_decoder(config, prompts, seeds):
    from actors.prior import PriorActor
    from actors.text_encoder import TextEncoderActor

    batch = prompt_batch(prompts, seeds)
    for actor_class in (TextEncoderActor, PriorActor, DecoderActor):
        batch = actor_class(StageContext(config=config))(batch)
    return batch


def test_a_final_stage_whose_model_turns_nan_gives_an_error_row_not_a_black_image(tiny_models):
    from actors.upsampler_256 import Upsampler256Actor

    config = load_config(None, FAST_STEPS + model_overrides(tiny_models, upsampler_1024=False, clip=False),
                         input_path="in", output_path="out")
    batch = stages_up_to_decoder(config, ["a red fox", "a blue bird"], [[1], [2]])
    final = Upsampler256Actor(StageContext(config=config, final_image=True))
    last_step = final.last.forward

    def second_image_turns_nan(*args, **kwargs):  # as an fp16 overflow would
        output = last_step(*args, **kwargs)
        output.sample[1] = float("nan")
        return output

    final.last.forward = second_image_turns_nan
    out = final(batch)
    assert out["status"].tolist() == ["ok", "error"]
    assert out["error"][1] == "upsampler_256 produced non-finite values in image"
    assert out["image"].dtype == np.uint8 and out["image"].shape == (2, 1, 64, 64, 3)
    assert out["image"][0].any(), "the rest of the batch goes on"


def test_generators_are_cpu_generators_whatever_device_the_stage_computes_on(tiny_models, monkeypatch):
    from actors.base import GENERATOR_STATE
    from actors.prior import PriorActor
    from actors.text_encoder import TextEncoderActor
    from pipeline import seeds

    config = load_config(None, FAST_STEPS + model_overrides(tiny_models, upsampler_1024=False, clip=False)
                         + ["prior.best_of=2"], input_path="in", output_path="out")
    actor = PriorActor(StageContext(config=config))
    assert actor.output_spec[GENERATOR_STATE] == ((5056,), np.dtype(np.uint8))
    # As on a GPU node: the stage computes on CUDA, yet its generators (which need no GPU to build) are CPU ones.
    actor.device = torch.device("cuda", 0)
    fresh = actor._generators({"seeds": np.array([5, 2**63 - 1], dtype=np.int64)})
    carried = actor._generators({GENERATOR_STATE: np.stack([seeds.generator_state(g) for g in fresh])})
    for generator, seed in zip(fresh + carried, [5, 2**63 - 1] * 2):
        assert generator.device.type == "cpu"
        assert torch.equal(generator.get_state(), torch.Generator("cpu").manual_seed(seed).get_state())

    made = []
    original = seeds.new_generator

    def recording(seed, *device):
        generator = original(seed, *device)
        made.append((device, generator.device.type))
        return generator

    monkeypatch.setattr(seeds, "new_generator", recording)
    actor.device = torch.device("cpu")
    actor(TextEncoderActor(StageContext(config=config))(prompt_batch(["a red fox"], [[3]])))
    # The candidate's own generator and best_of's extra one: CPU generators, built from a seed alone.
    assert made == [((), "cpu"), ((), "cpu")]
