"""The run report written beside the summary: report.json (per-stage figures, errors, CLIP scores) and a contact sheet."""

from __future__ import annotations

import heapq
import io
import tarfile
import textwrap
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc

from pipeline import storage
from pipeline.rowids import DIGEST, RepeatedDigests, digest
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
ERROR_REASONS_KEPT = 10_000
"""Distinct error reasons counted one by one; any beyond are counted together, so memory stays bounded."""
OTHER_REASONS = "(other reasons)"


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


class ScoreSketch:
    """CLIP scores summarised in fixed memory, whatever the rows: count, mean, min and max exactly; percentiles and
    the 10-bin histogram from a count per 0.01 of a score over CLIP's range (cosine x 100, so -100 to 100), so
    they are within 0.01 of the exact ones. 160 KB, where keeping every score took 8 bytes a row."""

    STEP = 0.01
    LOW, HIGH = -100.0, 100.0

    def __init__(self):
        self.counts = np.zeros(int(round((self.HIGH - self.LOW) / self.STEP)) + 1, np.int64)
        self.count, self.total, self.low, self.high = 0, 0.0, np.inf, -np.inf

    def add(self, scores) -> None:
        values = np.asarray(scores, dtype=np.float64)
        values = values[np.isfinite(values)]
        if not len(values):
            return
        slots = np.clip(np.rint((values - self.LOW) / self.STEP), 0, len(self.counts) - 1).astype(np.int64)
        self.counts += np.bincount(slots, minlength=len(self.counts))
        self.count += len(values)
        self.total += float(values.sum())
        self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))

    def _value(self, slot: np.ndarray) -> np.ndarray:
        return np.clip(self.LOW + slot * self.STEP, self.low, self.high)

    def _percentile(self, q: float) -> float:
        # As numpy's default (linear between the two nearest ranks), on values rounded to 0.01.
        position = q / 100 * (self.count - 1)
        below, above = int(np.floor(position)), int(np.ceil(position))
        ranks = np.cumsum(self.counts)
        low, high = self._value(np.searchsorted(ranks, np.array([below, above]), side="right"))
        return float(low + (high - low) * (position - below))

    def distribution(self) -> dict | None:
        if not self.count:
            return None
        edges = np.linspace(self.low, self.high, 11)
        occupied = np.nonzero(self.counts)[0]
        bins = np.clip(np.searchsorted(edges, self._value(occupied), side="right") - 1, 0, 9)
        counts = np.bincount(bins, weights=self.counts[occupied], minlength=10)
        return {"count": self.count, "mean": round(self.total / self.count, 4), "min": round(self.low, 4),
                "p10": round(self._percentile(10), 4), "median": round(self._percentile(50), 4),
                "p90": round(self._percentile(90), 4), "max": round(self.high, 4),
                "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]}}


def score_distribution(scores) -> dict | None:
    """The report's summary of a list of scores (None skipped), as ScoreSketch makes it."""
    sketch = ScoreSketch()
    sketch.add([s for s in scores if s is not None] if isinstance(scores, list) else scores)
    return sketch.distribution()


@dataclass
class MetadataScan:
    """What one streaming pass over the committed metadata found: the run's accounting and the report's inputs.

    Its memory does not grow with the rows: the duplicate check spills to local disk past a million rows
    (rowids.RepeatedDigests) and the scores are sketched (ScoreSketch)."""

    rows: int = 0
    """Input rows accounted for: one rank-0 row per generated prompt, one row per error."""
    ok: int = 0
    error: int = 0
    images: int = 0
    duplicates: list[str] = field(default_factory=list)
    """Row ids committed more than once (each once; empty when every row landed once)."""
    error_reasons: Counter = field(default_factory=Counter)
    clip_rank0: ScoreSketch = field(default_factory=ScoreSketch)
    """The scores of every generated prompt's kept best image."""
    clip_kept: ScoreSketch = field(default_factory=ScoreSketch)
    """The scores of every kept image."""
    sheet: list[dict] = field(default_factory=list)
    """The contact sheet's rows: the best image of the first SHEET_IMAGES generated prompts by id."""


def scan_metadata(output, limit: int = SHEET_IMAGES) -> MetadataScan:
    """One pass over the committed metadata parts, a record batch at a time."""
    scan = MetadataScan()
    keys = RepeatedDigests()  # (id, rank) pairs committed twice, in bounded memory
    sheet: list[tuple] = []  # the `limit` smallest ids so far, largest on top
    for batch in output.iter_metadata(list(REPORT_COLUMNS)):
        ids, ranks = batch.column("id").to_pylist(), batch.column("rank").to_pylist()
        keys.add(np.fromiter((digest(f"{i}\0{r}") for i, r in zip(ids, ranks)), dtype=DIGEST, count=len(ids)))
        ok = pc.fill_null(pc.equal(batch.column("status"), "ok"), False)
        first = pc.fill_null(pc.equal(batch.column("rank"), 0), False)
        ok_first = pc.and_(ok, first)
        errors = pc.invert(ok)
        scan.ok += pc.sum(ok_first).as_py() or 0
        scan.error += pc.sum(errors).as_py() or 0
        scan.images += pc.count(batch.column("image_key")).as_py()  # non-null keys: one per written image
        for reason in pc.filter(batch.column("error"), errors).to_pylist():
            if reason in scan.error_reasons or len(scan.error_reasons) < ERROR_REASONS_KEPT:
                scan.error_reasons[reason] += 1
            else:
                scan.error_reasons[OTHER_REASONS] += 1
        scores = batch.column("clip_score")
        scan.clip_rank0.add(pc.filter(scores, ok_first).drop_null().to_numpy(zero_copy_only=False))
        scan.clip_kept.add(pc.filter(scores, ok).drop_null().to_numpy(zero_copy_only=False))
        with_image = pc.and_(ok_first, pc.is_valid(batch.column("image_key")))
        candidates = batch.filter(with_image)
        candidate_ids = candidates.column("id").to_pylist()
        for index in heapq.nsmallest(limit, range(len(candidate_ids)), key=candidate_ids.__getitem__):
            row = {name: candidates.column(name)[index].as_py() for name in REPORT_COLUMNS}
            entry = (_Descending(row["id"]), row)
            if len(sheet) < limit:
                heapq.heappush(sheet, entry)
            elif row["id"] < sheet[0][1]["id"]:
                heapq.heapreplace(sheet, entry)
    scan.rows = scan.ok + scan.error
    twice = keys.repeated()
    if len(twice):
        scan.duplicates = _ids_of(output, set(twice.tolist()))
    scan.sheet = sorted((row for _, row in sheet), key=lambda r: r["id"])
    return scan


class _Descending:
    """Orders ids in reverse, so a heap's top is the largest id kept so far (the one to drop first)."""

    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __lt__(self, other: "_Descending") -> bool:
        return self.value > other.value


def _ids_of(output, wanted: set[bytes], most: int = 10) -> list[str]:
    """The ids behind repeated (id, rank) digests: a second pass, taken only when something repeated."""
    found: list[str] = []
    for batch in output.iter_metadata(["id", "rank"]):
        for row_id, rank in zip(batch.column("id").to_pylist(), batch.column("rank").to_pylist()):
            if digest(f"{row_id}\0{rank}") in wanted and row_id not in found:
                found.append(row_id)
                if len(found) >= most:
                    return found
    return found


def build_report(summary: dict, scan: MetadataScan) -> dict:
    """report.json's content: the summary's counters turned into rates, plus what the metadata says."""
    return {
        "output": summary["output"],
        "counts": summary["counts"],
        "wall_time_s": summary["wall_time_s"],
        "pipeline_span_s": summary["pipeline_span_s"],
        "images_per_s": summary["images_per_s"],
        "plan": summary["plan"],
        "cluster": summary["cluster"],
        "stages": stage_figures(summary["stages"]),
        "errors": {"rows": sum(scan.error_reasons.values()),
                   "by_reason": [{"reason": reason, "rows": n} for reason, n in scan.error_reasons.most_common(20)]},
        "clip_score": scan.clip_rank0.distribution(),
        "clip_score_all_kept": scan.clip_kept.distribution(),
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


def write_report(output, summary: dict, scan: MetadataScan | None = None) -> dict:
    """Write report.json and the contact sheet under the output path; returns the report."""
    scan = scan_metadata(output) if scan is None else scan
    report = build_report(summary, scan)
    rows = scan.sheet
    images = _read_images(output.fs, output.root, output.config.output.format, rows)
    captions = [(f"clip {r['clip_score']:.1f}: " if r["clip_score"] is not None else "") + r["prompt"] for r in rows]
    if images:
        output.write_bytes(CONTACT_SHEET_FILE, contact_sheet(images, captions))
    else:
        report["contact_sheet"] = None
    report["contact_sheet_images"] = len(images)
    output.write_json(REPORT_FILE, report)
    return report
