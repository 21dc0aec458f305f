"""Chaos: killed actors, a killed driver and two reruns at once, a lost node, a flaky object store, NaN rows.

Every case ends with the same check: each input row is in the metadata exactly once and every image equals
diffusers' reference for its recorded seed (which a clean run's images also equal, per test_exactness).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from actors.base import StageContext
from actors.decoder import DecoderActor
from pipeline.config import load_config
from pipeline.lease import LeaseError
from pipeline.run import RunFailed, generate
from tests.conftest import FAST_STEPS, ONE_GPU, model_overrides, psnr, run_in_process, within_tolerance, write_prompts
from tests.faults import ActorKiller, FaultyProxy
from benchmarks.reference import Reference
from tests.test_exactness import REFERENCE_STEPS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_BY_ONE = ["stages.text_encoder.batch_size=1", "stages.prior.batch_size=1", "stages.decoder.batch_size=1",
              "stages.upsampler_256.batch_size=1", "output.shard_size=2"]


def fault_sets(tiny_models, *extra) -> list[str]:
    return (FAST_STEPS + model_overrides(tiny_models, upsampler_1024=False, clip=False) + ONE_BY_ONE + ONE_GPU
            + list(extra))


def prompts_file(tmp_path, n: int) -> tuple[str, list[str]]:
    ids = [f"row{i:02d}" for i in range(n)]
    return write_prompts(tmp_path / "prompts.parquet", [f"prompt number {i}" for i in range(n)], id=ids), ids


@pytest.fixture(scope="module")
def reference(tiny_models):
    return Reference(tiny_models["unclip"], None)


def assert_complete_and_exact(output, ids, reference, read=None, sample=4):
    """Each id exactly once, no in-progress objects, and (a sample of) images equal to the reference."""
    read = read or (lambda key: Image.open(os.path.join(output, key)).convert("RGB"))
    rows = pq.read_table(os.path.join(output, "metadata")).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(ids), "every input row exactly once"
    assert all(r["status"] == "ok" for r in rows)
    for row in rows[:: max(1, len(rows) // sample)]:
        expected = reference.image(row["prompt"], row["seed"], **REFERENCE_STEPS)
        got = np.asarray(read(row["image_key"]))
        assert within_tolerance(got, expected), f"{row['id']}: {psnr(got, expected):.1f} dB"
    return rows


def test_killed_stage_actors_are_restarted_and_their_batches_retried(tiny_models, ray_session, reference, tmp_path):
    prompts, ids = prompts_file(tmp_path, 12)
    output = str(tmp_path / "out")
    killer = ActorKiller(kills=3, gap=1.0, seed=1)
    killer.start()
    try:
        # One actor per stage (not fused), so each stage loses one.
        result = generate(load_config(None, fault_sets(tiny_models, "run.fuse_stages=false"), input_path=prompts,
                                      output_path=output))
    finally:
        killer.stop.set()
        killer.join()
    assert len(killer.killed) == 3, f"the run ended before the killer struck three times: {killer.killed}"
    print(f"killed {len(killer.killed)} actors: {killer.killed}")
    assert result.summary["counts"]["ok"] == 12
    assert_complete_and_exact(output, ids, reference)


def snapshot(output: str) -> dict[str, tuple[int, int, int]]:
    found = {}
    for folder in ("images", "metadata"):
        path = os.path.join(output, folder)
        for name in os.listdir(path) if os.path.isdir(path) else []:
            stat = os.stat(os.path.join(path, name))
            found[f"{folder}/{name}"] = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    return found


def driver_command(prompts: str, output: str, sets: list[str]) -> list[str]:
    return [sys.executable, "-m", "jobs.generate", "--input", prompts, "--output", output,
            *[arg for s in sets for arg in ("--set", s)]]


def assert_no_orphan_images(output: str) -> None:
    """Every image file under the output is one the metadata names, and every name is there."""
    keys = {k for k in pq.read_table(os.path.join(output, "metadata")).column("image_key").to_pylist() if k}
    files = {f"images/{name}" for name in os.listdir(os.path.join(output, "images"))}
    assert files == keys, f"orphans {sorted(files - keys)[:3]}, missing {sorted(keys - files)[:3]}"


def test_a_killed_driver_then_two_reruns_at_once_one_refuses_and_the_other_finishes_its_work(
        tiny_models, ray_session, reference, tmp_path):
    n = 16
    prompts, ids = prompts_file(tmp_path, n)
    output = str(tmp_path / "out")
    sets = fault_sets(tiny_models, "output.lease_s=4")
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, PYTHONUNBUFFERED="1")
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(driver_command(prompts, output, sets), cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        metadata = os.path.join(output, "metadata")
        while time.time() < deadline and driver.poll() is None:
            if os.path.isdir(metadata) and len([p for p in os.listdir(metadata) if p.endswith(".parquet")]) >= 4:
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the driver finished before it could be killed"
        os.killpg(driver.pid, signal.SIGKILL)  # while shards are committing
        driver.wait(timeout=30)

    # Its lease has not lapsed yet: a rerun right away refuses (the killed driver might still be alive).
    with pytest.raises(LeaseError, match="is in use by another run"):
        generate(load_config(None, sets, input_path=prompts, output_path=output))
    time.sleep(4.5)
    before = snapshot(output)
    committed = len(pq.read_table(os.path.join(output, "metadata")).column("id"))
    assert 0 < committed < n

    # Once it has lapsed, a scheduler that fires twice starts two reruns at once: one refuses with one line,
    # the other takes the output over and generates only the rows the killed driver did not commit.
    reruns = [subprocess.Popen(driver_command(prompts, output, sets), cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(d.wait(timeout=600), *d.communicate()) for d in reruns]
    assert sorted(code for code, _, _ in results) == [0, 2], [(code, err[-2000:]) for code, _, err in results]
    refused = next(err for code, _, err in results if code == 2)
    errors = [line for line in refused.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "is in use by another run" in errors[0], refused[-2000:]
    assert refused.strip().endswith(errors[0]), "nothing after the error line"
    counts = json.loads(open(os.path.join(output, "_SUCCESS.json")).read())["counts"]
    print(f"driver killed with {committed}/{n} rows committed; the rerun skipped {counts['skipped']} and "
          f"generated {counts['generated_this_attempt']} rows (the uncommitted ones only)")
    assert counts["skipped"] == committed and counts["generated_this_attempt"] == n - committed
    after = snapshot(output)
    assert all(after[path] == stat for path, stat in before.items()), "finished files were rewritten"
    assert_complete_and_exact(output, ids, reference)
    assert_no_orphan_images(output)
    assert len(os.listdir(os.path.join(output, "images"))) == n, "no extra files"


def test_a_lost_node_is_survived_on_the_remaining_nodes(tiny_models, reference, tmp_path):
    prompts, ids = prompts_file(tmp_path, 12)
    output = str(tmp_path / "out")
    # Every stage fits on one GPU node, so the actors that died with the node can start on its replacement.
    sets = fault_sets(tiny_models, *[f"stages.{s}.num_gpus=0.2" for s in
                                     ("text_encoder", "prior", "decoder", "upsampler_256")],
                      *[f"stages.{s}.replicas=1" for s in ("text_encoder", "prior", "decoder", "upsampler_256")])
    args = json.dumps({"input": prompts, "output": output, "sets": sets})
    env = dict(os.environ, RAY_ADDRESS="", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS")
    done = subprocess.run([sys.executable, "-m", "tests.node_loss_run", args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=420)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-4000:]
    events = json.loads(lines[0][len("RESULT "):])
    print(f"node loss: {events}")
    assert events["removed_node"] and 2 <= events["committed_before_loss"] < 6
    assert events["counts"]["ok"] == 12
    assert_complete_and_exact(output, ids, reference)


def test_flaky_object_store_loses_nothing_and_shows_no_partial_objects(tiny_models, ray_session, reference,
                                                                      s3_endpoint, tmp_path):
    import s3fs

    direct = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret="x", skip_instance_cache=True)
    bucket = f"flaky-{uuid.uuid4().hex[:8]}"
    direct.mkdir(bucket)
    prompts, ids = prompts_file(tmp_path, 10)
    direct.put(prompts, f"{bucket}/in/prompts.parquet")
    with FaultyProxy(s3_endpoint, rate=0.3, seed=3) as proxy:
        sets = fault_sets(tiny_models, f"storage_options.endpoint_url={proxy.url}", "storage_options.key=testing",
                          "storage_options.secret=x", "output.format=webdataset")
        generate(load_config(None, sets, input_path=f"s3://{bucket}/in/", output_path=f"s3://{bucket}/out"))
    injected = {k: v for k, v in proxy.faults.items() if k != "forwarded"}
    print(f"faults injected: {injected} over {sum(proxy.faults.values())} requests")
    assert all(v > 0 for v in injected.values()), injected
    direct.invalidate_cache()
    objects = direct.find(f"{bucket}/out")
    assert not [o for o in objects if "inprogress" in o], "no in-progress object is visible"
    local = tmp_path / "fetched"
    for key in objects:
        target = local / key[len(f"{bucket}/out/"):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(direct.cat_file(key))
    import webdataset as wds

    images = {}
    for shard in (local / "shards").glob("*.tar"):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            images[sample["__key__"]] = Image.open(io.BytesIO(sample["png"])).convert("RGB")
    assert_complete_and_exact(str(local), ids, reference, read=images.__getitem__)
    assert len(images) == len(ids), "every committed row's image is in exactly one shard"


def test_a_row_with_nan_becomes_an_error_row_and_the_batch_goes_on(tiny_models):
    config = load_config(None, fault_sets(tiny_models), input_path="unused", output_path="unused")
    upstream = run_in_process(config, ["a red fox", "a blue bird"], [[1], [2]], stop_after="prior")
    decoder = DecoderActor(StageContext(config=config))

    calls = []

    def poison_first_image(module, args, output):
        if not calls:  # a numerical blow-up in the first row only
            output.sample[0] = float("nan")
        calls.append(1)

    decoder.decoder.register_forward_hook(poison_first_image)
    out = decoder(upstream)
    assert out["status"].tolist() == ["error", "ok"]
    assert out["error"][0] == "decoder produced non-finite values in image_64"
    assert np.isfinite(out["image_64"][1]).all() and torch.isfinite(torch.from_numpy(out["image_64"][1])).all()
