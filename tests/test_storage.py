"""Object storage against a real S3 HTTP endpoint on loopback (moto): atomic writes, retries, a full S3 run."""

from __future__ import annotations

import glob
import io
import json
import os
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from PIL import Image

from pipeline import storage
from pipeline.config import load_config
from tests.conftest import FAST_STEPS, ONE_GPU, write_prompts

SECRET = "moto-secret-do-not-log-7f3a"


@pytest.fixture
def s3(s3_endpoint):
    """A fresh filesystem client and bucket name prefix for one test."""
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret=SECRET, skip_instance_cache=True)
    prefix = f"t{uuid.uuid4().hex[:8]}"
    return fs, prefix


def test_atomic_write_and_read_back(s3, s3_endpoint):
    fs, prefix = s3
    fs.mkdir(f"{prefix}-out")
    target, root = storage.filesystem(f"s3://{prefix}-out/a/b.bin",
                                      {"endpoint_url": s3_endpoint, "key": "testing", "secret": SECRET})
    storage.atomic_write(target, root, b"x" * 1000)
    assert fs.cat_file(f"{prefix}-out/a/b.bin") == b"x" * 1000


def test_transient_errors_are_retried_and_permanent_ones_are_not():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        return "done"

    assert storage.with_retries(flaky, what="test", base_delay=0.001) == "done" and len(calls) == 3

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.with_retries(missing, what="test", base_delay=0.001)
    assert len(calls) == 1


def test_full_run_reads_prompts_and_models_from_s3_and_writes_there(tiny_models, ray_session, s3, s3_endpoint,
                                                                    tmp_path, monkeypatch, model_cache):
    from pipeline.run import generate

    fs, prefix = s3
    for bucket in ("prompts", "models", "out"):
        fs.mkdir(f"{prefix}-{bucket}")
    fs.put(write_prompts(tmp_path / "p.parquet", ["a red fox", "a blue bird", ""], id=["fox", "bird", "empty"]),
           f"{prefix}-prompts/batch/p.parquet")
    fs.put(tiny_models["unclip"], f"{prefix}-models/karlo", recursive=True)
    fs.put(tiny_models["clip"], f"{prefix}-models/clip", recursive=True)
    # Endpoint from the standard variable (forwarded to every actor), credentials from the config key.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    config = load_config(None, FAST_STEPS + ONE_GPU + [
        f"models.unclip=s3://{prefix}-models/karlo", "models.upsampler_1024=null", f"models.clip=s3://{prefix}-models/clip",
        "output.format=webdataset", "storage_options.key=testing", f"storage_options.secret={SECRET}",
    ], input_path=f"s3://{prefix}-prompts/batch/", output_path=f"s3://{prefix}-out/run1")
    summary = generate(config).summary
    assert summary["counts"]["ok"] == 2 and summary["counts"]["error"] == 1

    out = f"{prefix}-out/run1"
    fs.invalidate_cache()
    metadata = pq.read_table(f"{out}/metadata", filesystem=fs).to_pylist()
    assert sorted(r["id"] for r in metadata) == ["bird", "empty", "fox"]
    shards = fs.glob(f"{out}/shards/*.tar")
    assert len(shards) == 1
    import webdataset as wds

    local = tmp_path / "shard.tar"
    fs.get(shards[0], str(local))
    samples = list(wds.WebDataset(str(local), shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == ["bird_0", "fox_0"]
    for sample in samples:
        assert Image.open(io.BytesIO(sample["png"])).size == (64, 64)
        assert json.loads(sample["json"])["prompt"] in ("a red fox", "a blue bird")
    assert json.loads(fs.cat_file(f"{out}/_SUCCESS.json"))["config"]["storage_options"]["secret"] == "***"
    everything = b"".join(fs.cat_file(p) for p in fs.find(out))
    assert SECRET.encode() not in everything
    copies = glob.glob(os.path.join(model_cache, "models", "karlo-*", ".complete"))
    assert len(copies) == 1, "the actors copied the S3 checkpoint once into the node cache"
    logs = glob.glob(os.path.join(ray_session._private.worker._global_node.get_session_dir_path(), "logs", "*"))
    for path in logs:
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                assert SECRET.encode() not in fh.read(), f"secret leaked into {path}"


def test_endpoint_from_storage_options_alone(tiny_models, s3, s3_endpoint, tmp_path, monkeypatch):
    from pipeline import checkpoints
    from pipeline.reader import preflight

    fs, prefix = s3
    fs.mkdir(f"{prefix}-in")
    fs.put(write_prompts(tmp_path / "p.parquet", ["x", "y"]), f"{prefix}-in/p.parquet")
    fs.put(tiny_models["clip"], f"{prefix}-in/clip", recursive=True)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": SECRET}
    config = load_config(None, ["models.unclip=/x"] + [f"storage_options.{k}={v}" for k, v in options.items()],
                         input_path=f"s3://{prefix}-in/p.parquet", output_path="out")
    assert preflight(config).rows == 2
    monkeypatch.setenv("UNCLIP_RAY_CACHE", str(tmp_path / "cache"))
    local = checkpoints.local_dir(f"s3://{prefix}-in/clip", "clip", options)
    assert np.isfinite(checkpoints.load(local, "clip", "model").logit_scale.item())
