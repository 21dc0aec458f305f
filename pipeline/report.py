"""The run report written beside the summary: report.json (per-stage figures, errors, CLIP scores) and a contact sheet."""

from __future__ import annotations

import io
import tarfile
import textwrap
from collections import Counter

import numpy as np

from pipeline import storage
from pipeline.writer import SHARDS_DIR

REPORT_FILE = "report.json"
CONTACT_SHEET_FILE = "contact_sheet.png"
SHEET_IMAGES = 48
"""Kept images on the contact sheet at most (the first by id), so it stays one screen and under ~2 MB."""
SHEET_COLUMNS = 8
THUMB = 128
CAPTION_LINES = 3
CAPTION_CHARS = 24
REPORT_COLUMNS = ("id", "prompt", "status", "error", "rank", "clip_score", "image_key", "shard")


def stage_figures(stages: list[dict]) -> list[dict]:
    """Per-stage throughput and GPU time from the summary's stage counters."""
    figures = []
    for s in stages:
        active, busy = s.get("active_s") or 0.0, s.get("busy_s") or 0.0
        figures.append({
            "name": s["name"], "replicas": s["replicas"], "num_gpus": s["num_gpus"], "num_cpus": s["num_cpus"],
            "batch_rows": s["batch_rows"], "images_per_row": s["images_per_row"],
            "batch_images": s.get("batch_images", s["batch_rows"] * s["images_per_row"]),
            "gpu_bundles": s.get("bundles", []),
            "oom_halvings": s.get("oom_halvings", 0),
            "images": s["images"],
            "rows_per_s": round(s["images"] / s["images_per_row"] / active, 4) if active > 0 else None,
            "images_per_s": round(s["images"] / active, 4) if active > 0 else None,
            "busy_s": round(busy, 3), "active_s": round(active, 3),
            # Compute time times the GPU share each actor holds: what the stage cost in GPU-seconds.
            "gpu_seconds": round(busy * s["num_gpus"], 3) if s["num_gpus"] else None,
            "utilization": round(busy / (s["replicas"] * active), 4) if active > 0 else None,
        })
    return figures


def score_distribution(scores: list[float], bins: int = 10) -> dict | None:
    values = np.asarray([s for s in scores if s is not None], dtype=np.float64)
    if not len(values):
        return None
    counts, edges = np.histogram(values, bins=bins)
    q = np.percentile(values, [10, 50, 90])
    return {"count": int(len(values)), "mean": round(float(values.mean()), 4), "min": round(float(values.min()), 4),
            "p10": round(float(q[0]), 4), "median": round(float(q[1]), 4), "p90": round(float(q[2]), 4),
            "max": round(float(values.max()), 4),
            "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]}}


def build_report(summary: dict, metadata: dict[str, list]) -> dict:
    """report.json's content: the summary's counters turned into rates, plus what the metadata says."""
    rank0 = [i for i, rank in enumerate(metadata["rank"]) if rank == 0]
    errors = Counter(err for status, err in zip(metadata["status"], metadata["error"]) if status != "ok")
    return {
        "output": summary["output"],
        "counts": summary["counts"],
        "wall_time_s": summary["wall_time_s"],
        "pipeline_span_s": summary["pipeline_span_s"],
        "images_per_s": summary["images_per_s"],
        "plan": summary["plan"],
        "cluster": summary["cluster"],
        "stages": stage_figures(summary["stages"]),
        "errors": {"rows": sum(errors.values()),
                   "by_reason": [{"reason": reason, "rows": n} for reason, n in errors.most_common(20)]},
        "clip_score": score_distribution([metadata["clip_score"][i] for i in rank0]),
        "clip_score_all_kept": score_distribution(metadata["clip_score"]),
        "contact_sheet": CONTACT_SHEET_FILE,
    }


def _read_images(fs, root: str, output_format: str, rows: list[dict]) -> list:
    from PIL import Image

    images = []
    if output_format == "files":
        for row in rows:
            data = storage.with_retries(lambda row=row: fs.cat_file(storage.join(root, row["image_key"])),
                                        what=f"read {row['image_key']}")
            images.append(Image.open(io.BytesIO(data)).convert("RGB"))
        return images
    by_shard: dict[str, list[dict]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row)
    found = {}
    for shard, shard_rows in by_shard.items():
        data = storage.with_retries(lambda shard=shard: fs.cat_file(storage.join(root, SHARDS_DIR, f"{shard}.tar")),
                                    what=f"read shard {shard}")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = {member.name.rsplit(".", 1)[0]: member for member in tar.getmembers()
                     if not member.name.endswith(".json")}
            for row in shard_rows:
                member = names.get(row["image_key"])
                if member is not None:
                    found[id(row)] = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
    return [found[id(row)] for row in rows if id(row) in found]


def contact_sheet(images: list, captions: list[str]) -> bytes:
    """A PNG grid of thumbnails, each with a few lines of caption under it."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line_h = 12
    cell_w, cell_h = THUMB + 8, THUMB + 8 + CAPTION_LINES * line_h
    columns = max(1, min(SHEET_COLUMNS, len(images)))
    rows = max(1, -(-len(images) // columns))
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell_w + 4, (i // columns) * cell_h + 4
        sheet.paste(image.resize((THUMB, THUMB), Image.Resampling.LANCZOS), (x, y))
        for j, text in enumerate(textwrap.wrap(caption, CAPTION_CHARS)[:CAPTION_LINES]):
            draw.text((x, y + THUMB + 2 + j * line_h), text, fill="black", font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def sheet_rows(metadata: dict[str, list], limit: int = SHEET_IMAGES) -> list[dict]:
    rows = [dict(zip(metadata, values)) for values in zip(*metadata.values())]
    kept = sorted((r for r in rows if r["status"] == "ok" and r["image_key"] and r["rank"] == 0),
                  key=lambda r: r["id"])
    return kept[:limit]


def read_metadata(output) -> dict[str, list]:
    """The committed metadata columns the report (and the run's final accounting) need, as lists."""
    table = output.metadata(columns=list(REPORT_COLUMNS))
    return table.to_pydict() if table is not None else {k: [] for k in REPORT_COLUMNS}


def write_report(output, summary: dict, metadata: dict[str, list] | None = None) -> dict:
    """Write report.json and the contact sheet under the output path; returns the report."""
    metadata = read_metadata(output) if metadata is None else metadata
    report = build_report(summary, metadata)
    rows = sheet_rows(metadata)
    images = _read_images(output.fs, output.root, output.config.output.format, rows)
    captions = [(f"clip {r['clip_score']:.1f}: " if r["clip_score"] is not None else "") + r["prompt"] for r in rows]
    if images:
        output.write_bytes(CONTACT_SHEET_FILE, contact_sheet(images, captions))
    else:
        report["contact_sheet"] = None
    report["contact_sheet_images"] = len(images)
    output.write_json(REPORT_FILE, report)
    return report
