"""The run report: per-stage figures from the counters, errors and CLIP scores from the metadata, the contact sheet."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.output import OutputDir
from pipeline.report import THUMB, score_distribution, stage_figures, write_report
from tests.test_writer import batch

SUMMARY = {
    "output": "out", "counts": {"input_rows": 3, "ok": 2, "error": 1}, "wall_time_s": 10.0, "pipeline_span_s": 8.0,
    "images_per_s": 0.4, "plan": {}, "cluster": {"cpus": 4, "gpus": 2},
    "stages": [{"name": "decoder", "replicas": 2, "num_gpus": 0.5, "num_cpus": 1, "batch_rows": 2,
                "images_per_row": 2, "images": 8, "busy_s": 6.0, "active_s": 4.0}],
}


def test_stage_figures_turn_counters_into_rates_and_gpu_seconds():
    (decoder,) = stage_figures(SUMMARY["stages"])
    assert decoder["images_per_s"] == 2.0 and decoder["rows_per_s"] == 1.0
    assert decoder["gpu_seconds"] == 3.0  # 6 busy actor-seconds x half a GPU each
    assert decoder["utilization"] == 0.75 and decoder["batch_images"] == 4
    cpu_only = stage_figures([{**SUMMARY["stages"][0], "num_gpus": 0.0}])[0]
    assert cpu_only["gpu_seconds"] is None


def test_score_distribution():
    dist = score_distribution([10.0, 20.0, 30.0, None])
    assert dist["count"] == 3 and dist["median"] == 20.0 and dist["min"] == 10.0 and dist["max"] == 30.0
    assert sum(dist["histogram"]["counts"]) == 3
    assert score_distribution([]) is None


def test_score_sketch_matches_exact_statistics_within_its_resolution():
    from pipeline.report import ScoreSketch

    rng = np.random.default_rng(5)
    scores = np.clip(rng.normal(28, 6, 200_000), -100, 100).astype(np.float32)
    sketch = ScoreSketch()
    for chunk in np.array_split(scores, 7):  # added a record batch at a time
        sketch.add(chunk)
    got, values = sketch.distribution(), scores.astype(np.float64)
    assert got["count"] == len(values) and got["min"] == round(values.min(), 4) and got["max"] == round(values.max(), 4)
    assert abs(got["mean"] - values.mean()) < 1e-3
    for name, q in (("p10", 10), ("median", 50), ("p90", 90)):
        assert abs(got[name] - np.percentile(values, q)) <= ScoreSketch.STEP, name
    exact, _ = np.histogram(values, bins=10)
    assert sum(got["histogram"]["counts"]) == len(values)
    # Only scores within 0.01 of a bin edge can land in the neighbouring bin.
    assert np.abs(np.array(got["histogram"]["counts"]) - exact).max() <= 0.002 * len(values)


@pytest.mark.parametrize("output_format", ["files", "webdataset"])
def test_report_and_contact_sheet_from_what_the_output_holds(tmp_path, output_format):
    from pipeline.writer import ShardNumbers, ShardWriter

    config = load_config(None, ["models.unclip=/x", f"output.format={output_format}"], input_path="in",
                         output_path=str(tmp_path / "out"))
    data = batch(n_ok=2, keep=2, size=16)
    data["image"][0, 0] = 255  # the first kept image is white: find it on the sheet
    ShardWriter(config, ShardNumbers())(data)
    report = write_report(OutputDir(config), SUMMARY)

    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert report["errors"] == {"rows": 1, "by_reason": [{"reason": "prompt is empty", "rows": 1}]}
    assert report["clip_score"]["count"] == 2 and report["clip_score"]["max"] == 30.5  # rank-0 images
    assert report["clip_score_all_kept"]["count"] == 4
    assert report["contact_sheet_images"] == 2  # one per prompt (its best), sorted by id
    with Image.open(tmp_path / "out" / "contact_sheet.png") as sheet:
        pixels = np.asarray(sheet.convert("RGB"))
    assert pixels.shape[1] == 2 * (THUMB + 8)
    assert (pixels[4:4 + THUMB, 4:4 + THUMB] == 255).all()  # row-0's white image, top left
    assert not (pixels[4:4 + THUMB, THUMB + 12:2 * THUMB + 12] == 255).all()


def test_the_scan_counts_every_row_and_names_ids_committed_twice(tmp_path):
    from pipeline.report import scan_metadata
    from pipeline.writer import ShardNumbers, ShardWriter

    config = load_config(None, ["models.unclip=/x"], input_path="in", output_path=str(tmp_path / "out"))
    write = ShardWriter(config, ShardNumbers())
    first = batch(n_ok=2, keep=2, size=8)
    write(first)
    assert scan_metadata(OutputDir(config)).duplicates == []
    again = batch(n_ok=2, keep=2, size=8)
    again["id"] = np.array(["row-0", "other-1", "other-2"], dtype=object)  # row-0 committed a second time
    write(again)
    scan = scan_metadata(OutputDir(config))
    assert scan.duplicates == ["row-0"] and scan.rows == 6
