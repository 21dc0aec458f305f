"""Session fixtures: a private model cache with the tiny checkpoints on disk, one Ray with fake GPUs, helpers."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# Fewer steps than the defaults keep CPU tests fast; guidance stays on so it is exercised.
FAST_STEPS = ["stages.prior.steps=4", "stages.decoder.steps=4", "stages.upsampler_256.steps=3",
              "stages.upsampler_1024.steps=3"]


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("model-cache")
    os.environ["UNCLIP_RAY_CACHE"] = str(cache)  # Ray workers inherit it from the driver that starts Ray
    return str(cache)


@pytest.fixture(scope="session")
def tiny_models(model_cache) -> dict[str, str]:
    """The tiny checkpoints saved in their real layouts; configs point at these plain directories."""
    from pipeline import checkpoints

    return {name: checkpoints.local_dir(f"tiny://{name}", name) for name in ("unclip", "upsampler_1024", "clip")}


@pytest.fixture(scope="session")
def ray_session(model_cache):
    """One local Ray for the whole session: 4 logical CPUs and 2 fake GPUs (placement is real, compute is CPU)."""
    import ray

    # Ray binds to this machine's own address (it resolves 127.0.0.1 to it); nothing leaves the machine.
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint on loopback (moto), for the whole session; tests create their own buckets."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def write_prompts(path, prompts, **columns) -> str:
    table = {"prompt": pa.array(list(prompts), type=columns.pop("prompt_type", pa.string()))}
    for name, values in columns.items():
        table[name] = values
    pq.write_table(pa.table(table), path)
    return str(path)


def model_overrides(models: dict[str, str], *, upsampler_1024: bool = True, clip: bool = True) -> list[str]:
    return [f"models.unclip={models['unclip']}",
            f"models.upsampler_1024={models['upsampler_1024'] if upsampler_1024 else 'null'}",
            f"models.clip={models['clip'] if clip else 'null'}"]


def run_in_process(config, prompts, seeds, stop_after: str | None = None):
    """Every stage actor in order on one batch, in this process: the pure path without Ray."""
    from benchmarks.local import prompt_batch, run_stages

    return run_stages(config, prompt_batch(prompts, seeds), stop_after=stop_after)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def within_tolerance(a: np.ndarray, b: np.ndarray) -> bool:
    """The exactness tolerance: PSNR >= 40 dB and >= 99% of uint8 pixels within 2 levels."""
    close = np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16)) <= 2)
    return psnr(a, b) >= 40 and close >= 0.99
