"""Exactness: every image equals diffusers' UnCLIPPipeline (+ StableDiffusionUpscalePipeline) for its recorded seed."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import storage
from pipeline.config import load_config
from tests.conftest import (FAST_STEPS, ONE_GPU, SHARED_PROMPTS, model_overrides, psnr, run_in_process,
                            within_tolerance)
from benchmarks.reference import Reference

PROMPTS = ["a red fox in a snowy forest", "an astronaut riding a horse on the moon", "a bowl of ramen",
           "a lighthouse in a storm, oil painting", "a corgi wearing sunglasses"]
REFERENCE_STEPS = dict(prior_steps=4, decoder_steps=4, super_res_steps=3)


@pytest.fixture(scope="module")
def reference(tiny_models):
    return Reference(tiny_models["unclip"], tiny_models["upsampler_1024"])


def test_in_process_stages_equal_reference_at_256_and_1024(tiny_models, reference):
    seeds = [11, 2024, 7]
    prompts = PROMPTS[:3]
    config_256 = load_config(None, FAST_STEPS + model_overrides(tiny_models, upsampler_1024=False, clip=False)
                             + ["stages.prior.batch_size=2"], input_path="unused", output_path="unused")
    images = run_in_process(config_256, prompts, seeds)["image"]
    config_1024 = load_config(None, FAST_STEPS + model_overrides(tiny_models, clip=False),
                              input_path="unused", output_path="unused")
    upscaled = run_in_process(config_1024, prompts, seeds)["image"]
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        expected = reference.image(prompt, seed, **REFERENCE_STEPS)
        assert images[i, 0].shape == expected.shape == (64, 64, 3)
        assert within_tolerance(images[i, 0], expected), f"256 stage, prompt {i}: {psnr(images[i, 0], expected):.1f} dB"
        expected_1024 = reference.image(prompt, seed, **REFERENCE_STEPS, upscale_steps=3)
        assert upscaled[i, 0].shape == expected_1024.shape == (256, 256, 3)
        assert within_tolerance(upscaled[i, 0], expected_1024), \
            f"1024 stage, prompt {i}: {psnr(upscaled[i, 0], expected_1024):.1f} dB"


@pytest.mark.parametrize("wrong", ["seed", "prior_guidance", "decoder_guidance", "skipped_decoder_step"])
def test_the_comparison_detects_a_wrong_setting(tiny_models, reference, wrong):
    config = load_config(None, FAST_STEPS + model_overrides(tiny_models, upsampler_1024=False, clip=False),
                         input_path="unused", output_path="unused")
    ours = run_in_process(config, [PROMPTS[0]], [5])["image"][0, 0]
    settings = dict(REFERENCE_STEPS)
    seed = 5
    if wrong == "seed":
        seed = 6
    elif wrong == "prior_guidance":
        settings["prior_guidance"] = 3.0
    elif wrong == "decoder_guidance":
        settings["decoder_guidance"] = 6.0
    else:
        settings["decoder_steps"] = 3
    other = reference.image(PROMPTS[0], seed, **settings)
    assert not within_tolerance(ours, other)
    assert psnr(ours, other) < 30


@pytest.mark.parametrize("prior_guidance,decoder_guidance", [(4.0, 0.5), (0.5, 8.0), (1.0, 8.0), (0.5, 1.0)])
def test_guidance_is_decided_once_from_both_scales_as_in_the_reference(tiny_models, reference, prior_guidance,
                                                                        decoder_guidance):
    scales = [f"stages.prior.guidance_scale={prior_guidance}", f"stages.decoder.guidance_scale={decoder_guidance}"]
    config = load_config(None, FAST_STEPS + model_overrides(tiny_models, upsampler_1024=False, clip=False) + scales,
                         input_path="unused", output_path="unused")
    ours = run_in_process(config, [PROMPTS[1]], [3])["image"][0, 0]
    expected = reference.image(PROMPTS[1], 3, **REFERENCE_STEPS, prior_guidance=prior_guidance,
                               decoder_guidance=decoder_guidance)
    assert within_tolerance(ours, expected), f"{psnr(ours, expected):.1f} dB"


def test_stages_leave_each_candidate_generator_where_the_reference_leaves_it(tiny_models, reference):
    """Same draws from the same CPU generator: after the 256 stage its state is the reference's, byte for byte."""
    config = load_config(None, FAST_STEPS + model_overrides(tiny_models, upsampler_1024=False, clip=False),
                         input_path="unused", output_path="unused")
    seed = 2**63 - 1
    ours = run_in_process(config, [PROMPTS[2]], [seed])["generator_state"][0, 0]
    generator = torch.Generator("cpu").manual_seed(seed)
    reference.unclip(PROMPTS[2], generator=[generator], prior_num_inference_steps=4, decoder_num_inference_steps=4,
                     super_res_num_inference_steps=3, output_type="np")
    assert np.array_equal(ours, generator.get_state().numpy())


def read_outputs(output: str, by: str = "id") -> dict[str, tuple[str, int, np.ndarray]]:
    """(prompt, seed, pixels) of every image a run wrote, keyed by row id (or image key)."""
    import pyarrow.parquet as pq

    table = pq.read_table(storage.join(output, "metadata")).to_pylist()
    images = {}
    for row in table:
        assert row["status"] == "ok", row
        with Image.open(storage.join(output, row["image_key"])) as img:
            images[row[by]] = (row["prompt"], row["seed"], np.asarray(img.convert("RGB")))
    return images


def test_ray_runs_equal_reference_whatever_the_batching_and_replicas(tiny_models, reference, shared_run, tmp_path):
    from pipeline.run import generate

    # 1024px on CPU is the slow part: three prompts still split into several batches.
    # 'large' is the session's shared run: passes of 2 to 4 images, blocks of 2 rows split between two replicas
    # of every stage (co-located on the session's two GPUs), shards of 2 rows, CLIP scoring (one candidate per
    # prompt: it only scores, so it cannot change an image). 'small' runs here on the same input: one image per
    # pass and one actor per stage (one GPU), no CLIP stage.
    assert shared_run.code == 0, shared_run.stderr[-3000:]
    small = ONE_GPU + ["stages.text_encoder.batch_size=1", "stages.prior.batch_size=1", "stages.decoder.batch_size=1",
                       "stages.upsampler_256.batch_size=1", "stages.upsampler_1024.batch_size=1"]
    output = str(tmp_path / "small")
    generate(load_config(None, FAST_STEPS + model_overrides(tiny_models, clip=False) + small,
                         input_path=shared_run.prompts, output_path=output))
    runs = {"small": read_outputs(output), "large": read_outputs(str(shared_run.output))}
    large_placement = {s["name"]: s["replicas"] for s in shared_run.summary["stages"]}
    assert large_placement["decoder"] == large_placement["upsampler_256"] == 2, large_placement
    assert set(runs["small"]) == set(runs["large"]) and len(runs["small"]) == len(SHARED_PROMPTS)
    for row_id, (prompt, seed, image) in runs["small"].items():
        other = runs["large"][row_id][2]
        assert runs["large"][row_id][1] == seed
        assert within_tolerance(image, other), f"{row_id}: batching changed the image ({psnr(image, other):.1f} dB)"
        expected = reference.image(prompt, seed, **REFERENCE_STEPS, upscale_steps=3)
        assert within_tolerance(image, expected), f"{row_id}: {psnr(image, expected):.1f} dB vs UnCLIPPipeline"


# ---------------------------------------------------------------- variation mode


def _source_images(count: int) -> list:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)) for i in range(count)]


def _encoded(image, fmt: str = "PNG") -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def variation_config(tiny_models, *sets, upsampler_1024=False):
    return load_config(None, FAST_STEPS + model_overrides(tiny_models, upsampler_1024=upsampler_1024, clip=False)
                       + ["mode=variation", *sets], input_path="unused", output_path="unused")


def test_variations_equal_the_image_variation_pipeline_from_bytes_and_paths(tiny_models, reference, tmp_path):
    from benchmarks.local import image_batch, run_stages

    sources = _source_images(3)
    path = tmp_path / "source.jpg"
    sources[2].save(path, format="JPEG")
    values = [_encoded(sources[0]), _encoded(sources[1], "JPEG"), str(path)]
    as_decoded = [sources[0], Image.open(__import__("io").BytesIO(values[1])).convert("RGB"),
                  Image.open(path).convert("RGB")]
    seeds = [[11, 12], [2024, 2025], [7, 8]]  # candidate j of a row: base seed + j, as in text mode
    images = run_stages(variation_config(tiny_models, "rerank.candidates=2", "rerank.keep=2",
                                         "stages.decoder.batch_size=3"), image_batch(values, seeds))["image"]
    for i, source in enumerate(as_decoded):
        for j, seed in enumerate(seeds[i]):
            expected = reference.variation(seed, image=source, decoder_steps=4, super_res_steps=3)
            assert images[i, j].shape == expected.shape == (64, 64, 3)
            assert within_tolerance(images[i, j], expected), f"row {i} candidate {j}: {psnr(images[i, j], expected):.1f} dB"
    wrong = reference.variation(seeds[0][0] + 5, image=as_decoded[0], decoder_steps=4, super_res_steps=3)
    assert not within_tolerance(images[0, 0], wrong) and psnr(images[0, 0], wrong) < 30


def test_variation_from_a_given_embedding_and_at_1024(tiny_models, reference):
    from benchmarks.local import image_batch, run_stages

    embedding = np.random.default_rng(4).normal(size=32).astype(np.float32) * 3
    source = _source_images(1)[0]
    config = variation_config(tiny_models, upsampler_1024=True)
    images = run_stages(config, image_batch([None, _encoded(source)], [[5], [6]],
                                            image_embedding=[embedding.tolist(), None]))["image"]
    from_embedding = reference.variation(5, image_embeddings=embedding, decoder_steps=4, super_res_steps=3,
                                         upscale_steps=3)
    from_image = reference.variation(6, image=source, decoder_steps=4, super_res_steps=3, upscale_steps=3)
    assert images.shape[2:] == (256, 256, 3)
    assert within_tolerance(images[0, 0], from_embedding), f"{psnr(images[0, 0], from_embedding):.1f} dB"
    assert within_tolerance(images[1, 0], from_image), f"{psnr(images[1, 0], from_image):.1f} dB"
    other = reference.variation(5, image_embeddings=embedding * 0.5, decoder_steps=4, super_res_steps=3,
                                upscale_steps=3)
    assert not within_tolerance(images[0, 0], other)


def test_variation_guidance_follows_the_decoder_scale_alone(tiny_models, reference):
    from benchmarks.local import image_batch, run_stages

    source = _source_images(1)[0]
    # The prior's scale (> 1 here) must not switch guidance on: the variation pipeline has no prior.
    config = variation_config(tiny_models, "stages.decoder.guidance_scale=1.0", "stages.prior.guidance_scale=4.0")
    ours = run_stages(config, image_batch([_encoded(source)], [[9]]))["image"][0, 0]
    expected = reference.variation(9, image=source, decoder_steps=4, super_res_steps=3, decoder_guidance=1.0)
    assert within_tolerance(ours, expected), f"{psnr(ours, expected):.1f} dB"


# ---------------------------------------------------------------- interpolation and textdiff: slerps of embeddings
# Written here apart from the actor's own: the embeddings each frame should decode, from the reference's encoders.


def _slerp(a, b, theta):
    a_unit, b_unit = a / np.linalg.norm(a), b / np.linalg.norm(b)
    omega = np.arccos(np.clip(a_unit @ b_unit, -1.0, 1.0))
    if np.sin(omega) < 1e-6:
        return (1 - theta) * a + theta * b
    return (np.sin((1 - theta) * omega) * a + np.sin(theta * omega) * b) / np.sin(omega)


def _image_embedding(reference, image):
    pipe = reference.variations
    with torch.no_grad():
        pixels = pipe.feature_extractor(images=image, return_tensors="pt").pixel_values
        return pipe.image_encoder(pixels).image_embeds[0].double().numpy()


def _text_embedding(reference, text):
    pipe = reference.variations
    with torch.no_grad():
        ids = pipe.tokenizer([text], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids).text_embeds[0].double().numpy()


def test_interpolation_frames_equal_variations_of_the_slerped_embeddings(tiny_models, reference, tmp_path):
    from benchmarks.local import image_batch, run_stages

    image_a, image_b = _source_images(2)
    (tmp_path / "b.png").write_bytes(_encoded(image_b))
    # Row 0 takes interpolation.frames (null); row 1 asks for 3 of the 5; row 2 for more than the run allows.
    batch = image_batch([None] * 3, [[11], [11], [12]], image_a=[_encoded(image_a)] * 3,
                        image_b=[str(tmp_path / "b.png")] * 3, frames=[None, 3, 6])
    del batch["image"]
    config = variation_config(tiny_models, "mode=interpolation", "interpolation.frames=5", "stages.decoder.batch_size=2")
    out = run_stages(config, batch)
    assert list(out["status"]) == ["ok", "ok", "error"]
    assert out["error"][2] == ("frames must be from 2 to interpolation.frames=5 (the most any row of this run "
                               "decodes), got 6; raise interpolation.frames to allow more")
    for k, theta in enumerate((0.0, 0.5, 1.0)):  # row 1: its own 3 frames from image_a to image_b
        assert within_tolerance(out["image"][1][k], out["image"][0][2 * k]), f"3-frame row, frame {k}"
        assert out["frame_theta"][1][k] == pytest.approx(theta)
    frames = out["image"][0]
    assert frames.shape == (5, 64, 64, 3)
    z_a, z_b = _image_embedding(reference, image_a), _image_embedding(reference, image_b)
    for k in (0, 2, 4):
        expected = reference.variation(11, image_embeddings=_slerp(z_a, z_b, k / 4), decoder_steps=4,
                                       super_res_steps=3)
        assert within_tolerance(frames[k], expected), f"frame {k}: {psnr(frames[k], expected):.1f} dB"
    first = reference.variation(11, image=image_a, decoder_steps=4, super_res_steps=3)
    assert within_tolerance(frames[0], first), "frame 0 is image_a's variation with the row's seed"
    wrong_theta = reference.variation(11, image_embeddings=_slerp(z_a, z_b, 0.25), decoder_steps=4, super_res_steps=3)
    assert not within_tolerance(frames[2], wrong_theta)

    metadata = _written_metadata(config, out, tmp_path)
    assert sorted(k for k in metadata if k[0] == "row0") == [("row0", 0, k) for k in range(5)]
    assert sorted(k for k in metadata if k[0] == "row1") == [("row1", 0, k) for k in range(3)], "padding left out"
    assert [metadata[("row1", 0, k)]["rank"] for k in range(3)] == [0, 1, 2]
    assert metadata[("row2", None, None)]["status"] == "error"
    for k in range(5):
        row = metadata[("row0", 0, k)]
        assert (row["theta"], row["seed"], row["image_key"]) == (pytest.approx(k / 4), 11, f"images/row0_0_{k}.png")
        assert (row["source_a"], row["source_b"]) == ("bytes", str(tmp_path / "b.png"))
        assert (row["source_a_width"], row["source_a_height"], row["source_b_width"], row["source_b_height"]) == (
            56, 40, 56, 48)
        assert row["source_b_sha256"] == hashlib.sha256(_encoded(image_b)).hexdigest()


def _written_metadata(config, out, tmp_path) -> dict:
    """The metadata rows the shard writer makes of a stage chain's output, by (id, candidate, frame)."""
    import dataclasses

    from pipeline.writer import ShardNumbers, ShardWriter

    output = dataclasses.replace(config.output, path=str(tmp_path / "written"))
    ShardWriter(dataclasses.replace(config, output=output), ShardNumbers())(out)
    rows = pq.read_table(tmp_path / "written" / "metadata").to_pylist()
    return {(r["id"], r["candidate"], r["frame"]): r for r in rows}


def test_textdiff_frames_turn_the_image_embedding_toward_the_caption_change(tiny_models, reference, tmp_path):
    from benchmarks.local import image_batch, run_stages

    image = _source_images(1)[0]
    config = variation_config(tiny_models, "mode=textdiff", "textdiff.frames=4", "textdiff.theta_max=0.6",
                              "rerank.candidates=2", "rerank.keep=2", "output.save_embeddings=true")
    # Row 2 sets its own theta_max (a null one keeps textdiff.theta_max); row 3's is out of range.
    batch = image_batch([_encoded(image)] * 4, [[5, 6], [9, 10], [3, 4], [1, 2]],
                        prompts=["a photo of noise", "same words", "a photo of noise", "x"],
                        target_prompt=["an oil painting of noise", "same words", "an oil painting of noise", "y"],
                        theta_max=[None, None, 1.0, 1.5])
    out = run_stages(config, batch)
    assert list(out["status"]) == ["ok", "error", "ok", "error"]
    assert "no difference to move toward" in out["error"][1]
    assert out["error"][3] == "theta_max must be a number in (0, 1], got 1.5"
    assert [int(s) for s in out["seeds"][0]] == [5] * 4 + [6] * 4  # two trajectories of four frames
    z_image = _image_embedding(reference, image)
    difference = _text_embedding(reference, "an oil painting of noise") - _text_embedding(reference, "a photo of noise")
    direction = difference / np.linalg.norm(difference)
    scale = np.linalg.norm(z_image)
    for row, candidate, seed, theta in ((0, 0, 5, 0.0), (0, 3, 5, 0.6), (0, 7, 6, 0.6), (2, 3, 3, 1.0)):
        expected = reference.variation(seed, image_embeddings=scale * _slerp(z_image / scale, direction, theta),
                                       decoder_steps=4, super_res_steps=3)
        ours = out["image"][row, candidate]
        assert within_tolerance(ours, expected), f"row {row} image {candidate}: {psnr(ours, expected):.1f} dB"
    assert within_tolerance(out["image"][0, 0], reference.variation(5, image=image, decoder_steps=4, super_res_steps=3))
    wrong_theta = reference.variation(5, image_embeddings=scale * _slerp(z_image / scale, direction, 0.4),
                                      decoder_steps=4, super_res_steps=3)
    assert not within_tolerance(out["image"][0, 3], wrong_theta)

    metadata = _written_metadata(config, out, tmp_path)
    assert len(metadata) == 2 * 8 + 2
    last = metadata[("row0", 1, 3)]  # candidate (trajectory) 1, frame 3: image 7 of the row
    assert (last["mode"], last["seed"], last["theta"], last["target_prompt"]) == (
        "textdiff", 6, pytest.approx(0.6), "an oil painting of noise")
    assert (last["source"], last["source_width"], last["source_height"]) == ("bytes", 56, 40)
    assert last["source_sha256"] == hashlib.sha256(_encoded(image)).hexdigest()
    embedding = scale * _slerp(z_image / scale, direction, 0.6)
    np.testing.assert_allclose(last["image_embedding"], embedding, rtol=1e-4, atol=1e-4)
    assert metadata[("row2", 0, 3)]["theta"] == pytest.approx(1.0)
    assert metadata[("row3", None, None)]["error"] == "theta_max must be a number in (0, 1], got 1.5"


def test_an_image_encoder_from_a_clip_model_snapshot_embeds_as_clip_does(tiny_models):
    from transformers import CLIPImageProcessor, CLIPModel

    from benchmarks.local import image_batch, run_stages

    source = _source_images(1)[0]
    config = variation_config(tiny_models, f"models.image_encoder={tiny_models['clip']}")
    assert config.model_layouts()["unclip"] == "unclip_decoding"
    embeds = run_stages(config, image_batch([_encoded(source)], [[3]]), stop_after="image_encoder")["image_embeds"]
    clip = CLIPModel.from_pretrained(tiny_models["clip"]).eval()
    with torch.no_grad():
        pixels = CLIPImageProcessor.from_pretrained(tiny_models["clip"])(images=source, return_tensors="pt").pixel_values
        expected = clip.get_image_features(pixel_values=pixels)
        expected = getattr(expected, "pooler_output", expected)[0].numpy()
    np.testing.assert_allclose(embeds[0, 0], expected, rtol=1e-4, atol=1e-5)
