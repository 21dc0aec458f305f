"""CLIP reranking: scores equal CLIPModel's similarity, the best k are kept, and kept images keep their seeds."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from actors.base import StageContext
from actors.prior import sample_prior
from actors.reranker import RerankerActor, clip_scores, pixels_uint8
from pipeline import checkpoints, seeds
from pipeline.config import load_config
from tests.conftest import FAST_STEPS, ONE_GPU, model_overrides, psnr, run_in_process, within_tolerance, write_prompts
from benchmarks.reference import Reference
from tests.test_exactness import REFERENCE_STEPS, read_outputs


def config_for(tiny_models, *extra, upsampler_1024=False):
    return load_config(None, FAST_STEPS + model_overrides(tiny_models, upsampler_1024=upsampler_1024) + list(extra),
                       input_path="unused", output_path="unused")


def test_scores_equal_clip_model_similarity(tiny_models):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_models["clip"]).eval()
    processor = CLIPProcessor.from_pretrained(tiny_models["clip"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    prompts = ["a red fox", "a blue bird", "a green frog"]
    ours = clip_scores(checkpoints.load(tiny_models["clip"], "clip", "model"),
                       checkpoints.load(tiny_models["clip"], "clip", "tokenizer"),
                       checkpoints.load(tiny_models["clip"], "clip", "image_processor"),
                       prompts, images, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        out = model(**processor(text=prompts, images=list(images), return_tensors="pt", padding=True))
    expected = 100 * (out.text_embeds * out.image_embeds).sum(-1)  # CLIPModel's embeds are L2-normalized
    assert torch.allclose(ours, expected, atol=1e-4)


def test_keeps_the_best_k_and_carries_their_columns(tiny_models):
    config = config_for(tiny_models, "rerank.candidates=4", "rerank.keep=2")
    actor = RerankerActor(StageContext(config=config, options={"column": "image_64"}))
    rng = np.random.default_rng(1)
    n = 3
    batch = {"id": np.array(["a", "b", "c"], dtype=object), "prompt": np.array(["fox", "bird", ""], dtype=object),
             "status": np.array(["ok", "ok", "error"], dtype=object), "error": np.array(["", "", "empty"], dtype=object),
             "truncated": np.zeros(n, bool), "seeds": np.arange(12, dtype=np.int64).reshape(n, 4),
             "generator_state": rng.integers(0, 255, (n, 4, 8), dtype=np.uint8),
             "image_64": rng.uniform(-1, 1, (n, 4, 3, 16, 16)).astype(np.float32)}
    out = actor(dict(batch))
    for i in range(2):
        order = np.argsort(-out["candidate_scores"][i], kind="stable")[:2]
        assert list(out["candidate"][i]) == list(order)
        assert out["clip_score"][i][0] == out["candidate_scores"][i].max()
        assert list(out["seeds"][i]) == list(batch["seeds"][i][order])
        assert np.array_equal(out["image_64"][i], batch["image_64"][i][order])
        assert np.array_equal(out["generator_state"][i], batch["generator_state"][i][order])
    assert out["image_64"].shape == (n, 2, 3, 16, 16) and out["_images_reranker"].tolist() == [4, 4, 0]


def test_scores_in_fp32_whatever_the_run_dtype(tiny_models):
    config = config_for(tiny_models, "dtype=fp16", "stages.reranker.dtype=fp16", "rerank.candidates=2", "rerank.keep=1")
    actor = RerankerActor(StageContext(config=config, options={"column": "image_64"}))
    assert actor.dtype == torch.float32
    assert {p.dtype for p in actor.model.parameters()} == {torch.float32}
    rng = np.random.default_rng(2)
    images = rng.uniform(-1, 1, (1, 2, 3, 16, 16)).astype(np.float32)
    out = actor({"id": np.array(["a"], dtype=object), "prompt": np.array(["a red fox"], dtype=object),
                 "status": np.array(["ok"], dtype=object), "error": np.array([""], dtype=object),
                 "truncated": np.zeros(1, bool), "seeds": np.array([[0, 1]], dtype=np.int64), "image_64": images})
    with torch.no_grad():
        fp32 = clip_scores(checkpoints.load(tiny_models["clip"], "clip", "model", torch_dtype=torch.float32),
                           actor.tokenizer, actor.image_processor, ["a red fox"] * 2,
                           pixels_uint8("image_64", images[0]), torch.device("cpu"), torch.float32)
    assert out["candidate_scores"].dtype == np.float32
    np.testing.assert_array_equal(out["candidate_scores"][0], fp32.numpy())


@pytest.mark.parametrize("at,expected_256_images", [("decoder", 2), ("upsampler_256", 3)])
def test_upsamplers_get_k_images_when_reranking_at_the_decoder(tiny_models, at, expected_256_images):
    config = config_for(tiny_models, "rerank.candidates=3", "rerank.keep=2", f"rerank.at={at}", upsampler_1024=True)
    out = run_in_process(config, ["a red fox", "a blue bird"], [[5, 6, 7], [50, 51, 52]])
    assert out["_images_decoder"].tolist() == [3, 3]
    assert out["_images_upsampler_256"].tolist() == [expected_256_images] * 2
    assert out["_images_upsampler_1024"].tolist() == [2, 2]
    assert out["image"].shape == (2, 2, 256, 256, 3)


def test_best_of_keeps_the_embedding_closest_to_the_text(tiny_models):
    config = config_for(tiny_models, "prior.best_of=3")
    out = run_in_process(config, ["a red fox"], [[9]], stop_after="prior")
    prior = checkpoints.load(tiny_models["unclip"], "unclip", "prior")
    scheduler = checkpoints.load(tiny_models["unclip"], "unclip", "prior_scheduler")
    text = {k: torch.from_numpy(np.asarray(out[k])) for k in
            ("text_embeds", "text_hidden", "text_mask", "uncond_embeds", "uncond_hidden", "uncond_mask")}
    samples = []
    for i in range(3):
        generator = seeds.new_generator(seeds.best_of_seed(9, i))
        with torch.no_grad():
            samples.append(sample_prior(prior, scheduler, text, [generator], steps=4, guidance_scale=4.0, cfg=True)[0])
    scores = [float(s @ text["text_embeds"][0]) for s in samples]
    best = samples[int(np.argmax(scores))].numpy()
    assert np.allclose(out["image_embeds"][0, 0], best, atol=1e-5)


def test_ray_run_with_reranking_keeps_reference_images(tiny_models, ray_session, tmp_path):
    from pipeline.run import generate

    prompts = write_prompts(tmp_path / "p.parquet", ["a red fox", "a blue bird"], id=["fox", "bird"])
    output = tmp_path / "out"
    config = load_config(None, FAST_STEPS + model_overrides(tiny_models, upsampler_1024=False) + ONE_GPU
                         + ["rerank.candidates=3", "rerank.keep=2", "seed=17"], input_path=prompts,
                         output_path=str(output))
    summary = generate(config).summary
    rows = pq.read_table(output / "metadata").to_pylist()
    assert sorted((r["id"], r["rank"]) for r in rows) == [("bird", 0), ("bird", 1), ("fox", 0), ("fox", 1)]
    for row in rows:
        scores = row["candidate_scores"]
        assert len(scores) == 3
        assert row["clip_score"] == pytest.approx(sorted(scores, reverse=True)[row["rank"]])
        assert row["clip_score"] == pytest.approx(scores[row["candidate"]])
        base = seeds.derived_base_seed(17, row["id"])
        assert row["seed"] == base + row["candidate"]
    stages = {s["name"]: s for s in summary["stages"]}
    assert stages["decoder"]["images"] == 6 and stages["reranker"]["images"] == 6
    assert stages["upsampler_256"]["images"] == 4, "only the kept candidates are upsampled"
    reference = Reference(tiny_models["unclip"], None)
    images = read_outputs(str(output), by="image_key")
    for row in rows:
        expected = reference.image(row["prompt"], row["seed"], **REFERENCE_STEPS)
        got = images[row["image_key"]][2]
        assert within_tolerance(got, expected), f"{row['image_key']}: {psnr(got, expected):.1f} dB"


def test_uncaptioned_variations_are_scored_against_their_source_image(tiny_models):
    import io

    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

    from benchmarks.local import image_batch, run_stages

    source = Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    config = config_for(tiny_models, "mode=variation", "rerank.candidates=3", "rerank.keep=3")
    out = run_stages(config, image_batch([buffer.getvalue()], [[40, 41, 42]]), stop_after="reranker",
                     has_prompts=False)
    # Independently: the source's embedding from the image encoder, each candidate's from CLIPModel.
    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny_models["unclip"], subfolder="image_encoder").eval()
    extractor = CLIPImageProcessor.from_pretrained(tiny_models["unclip"], subfolder="feature_extractor")
    clip = CLIPModel.from_pretrained(tiny_models["clip"]).eval()
    processor = CLIPImageProcessor.from_pretrained(tiny_models["clip"])
    with torch.no_grad():
        z = encoder(extractor(images=source, return_tensors="pt").pixel_values).image_embeds[0]
        candidates = pixels_uint8("image_64", out["image_64"][0])
        features = clip.get_image_features(pixel_values=processor(images=list(candidates), return_tensors="pt").pixel_values)
        features = getattr(features, "pooler_output", features)
        expected = (100 * torch.nn.functional.cosine_similarity(features, z[None], dim=-1)).numpy()
    order = np.argsort(-expected, kind="stable")
    assert list(out["candidate"][0]) == list(order)  # every candidate kept, best first
    np.testing.assert_allclose(out["clip_score"][0], expected[order], atol=1e-3)
    assert [int(s) for s in out["seeds"][0]] == [40 + int(c) for c in order]
    assert "source_embeds" not in out
