"""Image modes through Ray: a variation run on object storage with bad images as error rows, a textdiff run."""

from __future__ import annotations

import hashlib
import io
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import s3fs
from PIL import Image

from pipeline.config import load_config
from tests.conftest import FAST_STEPS, ONE_GPU, model_overrides, psnr, within_tolerance

SECRET = "moto-secret-variations"


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def source_embedding(reference, image: Image.Image) -> np.ndarray:
    """The reference pipeline's raw image embedding of a source image (what a variation decodes)."""
    import torch

    pipe = reference.variations
    with torch.no_grad():
        pixels = pipe.feature_extractor(images=image, return_tensors="pt").pixel_values
        return pipe.image_encoder(pixels).image_embeds[0].numpy()


def test_a_variation_run_reads_images_from_s3_and_keeps_going_past_bad_ones(tiny_models, ray_session, s3_endpoint,
                                                                           tmp_path, monkeypatch):
    from benchmarks.reference import Reference
    from pipeline.run import generate

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret=SECRET, skip_instance_cache=True)
    bucket = f"v{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    rng = np.random.default_rng(7)
    sources = [Image.fromarray(rng.integers(0, 256, (48, 40 + 8 * i, 3), dtype=np.uint8)) for i in range(3)]
    for i, source in enumerate(sources):
        fs.pipe_file(f"{bucket}/images/{i}.png", encoded(source))
    fs.pipe_file(f"{bucket}/images/empty.png", b"")
    huge = encoded(Image.new("1", (8001, 8001)))
    rows = {  # id -> image value; ok rows first
        "s3-0": f"s3://{bucket}/images/0.png", "s3-1": f"s3://{bucket}/images/1.png", "bytes-2": encoded(sources[2]),
        "corrupt": b"\x89PNG not really", "missing": f"s3://{bucket}/images/missing.png",
        "empty": f"s3://{bucket}/images/empty.png", "huge": huge, "null": None,
    }
    # Paths and bytes in two files: a Parquet column is either string or binary.
    urls = {k: v for k, v in rows.items() if isinstance(v, str)}
    blobs = {k: v for k, v in rows.items() if not isinstance(v, str)}
    pq.write_table(pa.table({"id": list(urls), "image": pa.array(list(urls.values()), pa.string())}),
                   tmp_path / "urls.parquet")
    pq.write_table(pa.table({"id": list(blobs), "image": pa.array(list(blobs.values()), pa.binary())}),
                   tmp_path / "blobs.parquet")
    fs.put(str(tmp_path / "urls.parquet"), f"{bucket}/input/urls.parquet")
    fs.put(str(tmp_path / "blobs.parquet"), f"{bucket}/input/blobs.parquet")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    config = load_config(None, FAST_STEPS + ONE_GPU + model_overrides(tiny_models, upsampler_1024=False) + [
        "mode=variation", "rerank.candidates=2", "rerank.keep=2", "stages.image_encoder.batch_size=2",
        "stages.decoder.batch_size=3", "stages.upsampler_256.batch_size=2", "output.shard_size=3",
        "storage_options.key=testing", f"storage_options.secret={SECRET}", "output.save_embeddings=true",
    ], input_path=f"s3://{bucket}/input/", output_path=f"s3://{bucket}/out")
    summary = generate(config).summary
    assert (summary["counts"]["ok"], summary["counts"]["error"], summary["counts"]["images"]) == (3, 5, 6)
    # No captions: the reranker orders each row's candidates by likeness to the source and keeps them all.
    assert [s["name"] for s in summary["stages"]] == ["image_encoder", "decoder", "reranker", "upsampler_256"]

    fs.invalidate_cache()
    metadata = {(r["id"], r["candidate"]): r for r in
                pq.read_table(f"{bucket}/out/metadata", filesystem=fs).to_pylist()}
    errors = {k[0]: r["error"] for k, r in metadata.items() if r["status"] == "error"}
    assert errors["corrupt"].startswith("image bytes is not in an image format Pillow can read")
    assert errors["missing"] == f"image s3://{bucket}/images/missing.png does not exist"
    assert errors["empty"] == f"image s3://{bucket}/images/empty.png is empty (0 bytes)"
    assert errors["huge"] == "image bytes is 8001x8001, more than 64 megapixels; downscale it first"
    assert errors["null"] == "image is null"
    # Where each row's image came from, even for error rows.
    assert (metadata[("missing", None)]["source"], metadata[("missing", None)]["source_sha256"]) == (
        f"s3://{bucket}/images/missing.png", None)
    assert metadata[("corrupt", None)]["source_sha256"] == hashlib.sha256(rows["corrupt"]).hexdigest()
    assert metadata[("null", None)]["source"] is None
    reference = Reference(tiny_models["unclip"], None)
    for i, row_id in enumerate(["s3-0", "s3-1", "bytes-2"]):
        embedding = source_embedding(reference, sources[i])
        for candidate in (0, 1):
            row = metadata[(row_id, candidate)]
            assert row["status"] == "ok" and -100 <= row["clip_score"] <= 100
            assert (row["mode"], row["frame"], row["theta"]) == ("variation", 0, None)
            assert row["source"] == (rows[row_id] if isinstance(rows[row_id], str) else "bytes")
            assert row["source_sha256"] == hashlib.sha256(encoded(sources[i])).hexdigest()
            assert (row["source_width"], row["source_height"]) == sources[i].size
            np.testing.assert_allclose(row["image_embedding"], embedding, rtol=1e-4, atol=1e-5)
            image = np.asarray(Image.open(io.BytesIO(fs.cat_file(f"{bucket}/out/{row['image_key']}"))))
            expected = reference.variation(row["seed"], image=sources[i], decoder_steps=4, super_res_steps=3)
            assert within_tolerance(image, expected), f"{row_id}/{candidate}: {psnr(image, expected):.1f} dB"
        assert metadata[(row_id, 1)]["seed"] == (metadata[(row_id, 0)]["seed"] + 1) % 2**63
        ranked = sorted((metadata[(row_id, c)] for c in (0, 1)), key=lambda r: r["rank"])
        assert ranked[0]["clip_score"] >= ranked[1]["clip_score"]


def test_a_textdiff_run_through_ray_writes_every_frame_to_webdataset_shards(tiny_models, ray_session, tmp_path):
    import webdataset as wds

    from benchmarks.reference import Reference
    from pipeline.run import generate
    from tests.test_exactness import _image_embedding, _slerp, _text_embedding

    rng = np.random.default_rng(11)
    source = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    (tmp_path / "source.png").write_bytes(encoded(source))
    # 'short' asks for 2 of the run's 3 frames (its own `frames`) and keeps textdiff.theta_max (null theta_max).
    pq.write_table(pa.table({
        "id": ["paint", "short", "same"], "image": [str(tmp_path / "source.png")] * 3,
        "prompt": ["a photo of noise", "a photo of noise", "same words"],
        "target_prompt": ["an oil painting of noise", "an oil painting of noise", "same words"],
        "theta_max": pa.array([1.0, None, None], pa.float64()), "frames": pa.array([None, 2, None], pa.int64()),
        "seed": pa.array([21, 8, 4], pa.int64()),
    }), tmp_path / "rows.parquet")
    # Two decoder actors (one for each other stage, so fewer processes start): rows of 3 images in decoder passes
    # of 2 make batches of one row, which the two decoders split between them.
    config = load_config(None, FAST_STEPS + model_overrides(tiny_models, upsampler_1024=False, clip=False) + [
        "mode=textdiff", "textdiff.frames=3", "output.format=webdataset", "stages.decoder.batch_size=2",
        "stages.decoder.replicas=2", "stages.decoder.num_gpus=0.5", *[f"stages.{stage}.{setting}" for stage in (
            "image_encoder", "upsampler_256") for setting in ("replicas=1", "num_gpus=0.25")],
    ], input_path=str(tmp_path / "rows.parquet"), output_path=str(tmp_path / "out"))
    summary = generate(config).summary
    assert (summary["counts"]["ok"], summary["counts"]["error"], summary["counts"]["images"]) == (2, 1, 5)
    # The image encoder stage embeds the captions too (with the checkpoint's text encoder): no text encoder stage.
    assert [s["name"] for s in summary["stages"]] == ["image_encoder", "decoder", "upsampler_256"]

    metadata = {(r["id"], r["frame"]): r for r in pq.read_table(tmp_path / "out" / "metadata").to_pylist()}
    assert "no difference to move toward" in metadata[("same", None)]["error"]
    samples = {s["__key__"]: s for tar in sorted((tmp_path / "out" / "shards").glob("*.tar"))
               for s in wds.WebDataset(str(tar), shardshuffle=False)}
    assert sorted(samples) == ["paint_0_0", "paint_0_1", "paint_0_2", "short_0_0", "short_0_1"]
    reference = Reference(tiny_models["unclip"], None)
    z_image = _image_embedding(reference, source)
    difference = _text_embedding(reference, "an oil painting of noise") - _text_embedding(reference, "a photo of noise")
    scale = np.linalg.norm(z_image)
    # paint: its own theta_max of 1.0 over 3 frames; short: textdiff.theta_max 0.5 over its own 2 frames.
    for row_id, seed, frame, theta in (("paint", 21, 0, 0.0), ("paint", 21, 1, 0.5), ("paint", 21, 2, 1.0),
                                       ("short", 8, 1, 0.5)):
        row = metadata[(row_id, frame)]
        assert (row["seed"], row["candidate"], row["theta"], row["image_key"]) == (seed, 0, theta,
                                                                                   f"{row_id}_0_{frame}")
        image = np.asarray(Image.open(io.BytesIO(samples[row["image_key"]]["png"])))
        expected = reference.variation(seed, image_embeddings=scale * _slerp(
            z_image / scale, difference / np.linalg.norm(difference), theta), decoder_steps=4, super_res_steps=3)
        assert within_tolerance(image, expected), f"{row_id} frame {frame}: {psnr(image, expected):.1f} dB"
    assert len([a for a in summary["actors"] if a["stage"] == "decoder"]) == 2


def test_a_variation_input_of_embeddings_alone_needs_no_image_column(tiny_models):
    from actors.base import StageContext
    from actors.image_encoder import ImageEncoderActor
    from benchmarks.local import prompt_batch

    config = load_config(None, FAST_STEPS + model_overrides(tiny_models, upsampler_1024=False, clip=False)
                         + ["mode=variation"], input_path="in", output_path="out")
    encoder = ImageEncoderActor(StageContext(config=config))
    batch = prompt_batch([""], [[3]])
    batch["image_embedding"] = np.empty(1, dtype=object)
    batch["image_embedding"][0] = [0.1] * encoder.dim
    out = encoder(batch)
    assert (out["status"][0], out["error"][0], out["source"][0]) == ("ok", "", "")
