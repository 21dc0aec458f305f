"""Output writers: one sink interface for every image format, and the shard writer whose metadata part commits it."""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from abc import ABC, abstractmethod

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import images as source_images
from pipeline import storage
from pipeline.config import FRAME_THETA_COLUMN, FRAMES_COLUMN, IMAGE_EMBEDDING_COLUMN, TARGET_PROMPT_COLUMN, Config
from pipeline.counters import merge_stage_counters
from pipeline.lease import LEASE_FILE, read_lease

IMAGES_DIR = "images"
SHARDS_DIR = "shards"
METADATA_DIR = "metadata"
STATS_DIR = "stats"
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}
KEY_LIMIT = 80
UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
HASHED_SUFFIX = re.compile(r"-[0-9a-f]{16}$")

METADATA_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("candidate", pa.int32()),
    ("rank", pa.int32()), ("clip_score", pa.float32()), ("candidate_scores", pa.list_(pa.float32())),
    ("image_key", pa.string()), ("shard", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("status", pa.string()), ("error", pa.string()), ("truncated", pa.bool_()),
])


ARROW_KINDS = {str: pa.string(), int: pa.int32()}


def metadata_schema(config: Config) -> pa.Schema:
    """The metadata columns of a run: the common ones, then the mode's and the options'.

    Image modes add `mode`, per source image its origin, SHA-256 and size (`source_*`, or `source_a_*` and
    `source_b_*` for interpolation), each image's `frame` and `theta`, and textdiff its `target_prompt`;
    output.save_embeddings adds each image's CLIP image embedding."""
    fields = list(METADATA_SCHEMA)
    if config.image_mode:
        fields.append(pa.field("mode", pa.string()))
        fields += [pa.field(name, ARROW_KINDS[kind])
                   for name, kind in source_images.source_columns(config.mode).items()]
        fields += [pa.field("frame", pa.int32()), pa.field("theta", pa.float64())]
        if config.mode == "textdiff":
            fields.append(pa.field(TARGET_PROMPT_COLUMN, pa.string()))
    if config.output.save_embeddings:
        fields.append(pa.field(IMAGE_EMBEDDING_COLUMN, pa.list_(pa.float32())))
    return pa.schema(fields)


def _optional(value, kind=str):
    """A row-level value as the stages hand it on, with "" or 0 for unknown -> the value or None."""
    return kind(value) or None if value is not None else None


def safe_key(row_id: str) -> str:
    """An object-key-safe, unique stem for an untrusted id: [A-Za-z0-9_-] only, bounded, no dots or slashes.

    Ids that needed changing get a hash of the original appended, so distinct ids never collide; an id that
    merely looks like such a key is hashed too, so it cannot take another id's key.
    """
    cleaned = UNSAFE.sub("_", row_id)[:KEY_LIMIT]
    if cleaned == row_id and cleaned and not HASHED_SUFFIX.search(cleaned):
        return cleaned
    digest = hashlib.blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"{cleaned}-{digest}" if cleaned else digest


SHARD_DIGITS = 5


def shard_name(number: int) -> str:
    """00000, 00001, ...: shards, metadata parts and stats files share the name, so brace lists work."""
    return f"{number:0{SHARD_DIGITS}d}"


def shard_number(shard: str) -> int | None:
    """The number in a shard's name; None for a name that is not a number (parts of older versions)."""
    return int(shard) if shard.isdigit() else None


def rows_digest(ids) -> str:
    """A digest of a shard's row ids (in any order): the same rows get the same shard number."""
    digest = hashlib.blake2b(digest_size=10)
    for row_id in sorted(str(i) for i in ids):
        digest.update(row_id.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def legacy_part_attempt(shard: str) -> str | None:
    """The attempt in an older version's part name, part-<attempt>-<digest> (None for any other name)."""
    if not shard.startswith("part-") or shard.count("-") < 2:
        return None
    return shard[len("part-"):].rsplit("-", 1)[0]


class ShardNumbers:
    """Hands out one attempt's shard numbers in order, from `first` up to (not including) `end`.

    The same rows always get the same number, so a retried write replaces its own objects instead of adding
    new ones. The range is recorded in the output before any shard is written and the next attempt starts
    above it: a late write by a dead attempt can never take a name the live attempt uses."""

    def __init__(self, first: int = 0, end: int | None = None):
        self.next, self.end = first, end
        self.given: dict[str, int] = {}

    def number(self, digest: str) -> int:
        if digest not in self.given:
            if self.end is not None and self.next >= self.end:
                raise RuntimeError(f"this attempt used every shard number it reserved ({self.end - 1} is the "
                                   "last); rerun the same command to go on (finished rows are kept)")
            self.given[digest] = self.next
            self.next += 1
        return self.given[digest]


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if image_format == "png":
        image.save(buffer, format="PNG")
    elif image_format == "webp":
        image.save(buffer, format="WEBP", quality=quality)
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


STATS_SUFFIX = "_stats.json"


class ImageSink(ABC):
    """Where a shard's images go. `add` stages one image; `commit` makes the shard's images visible."""

    stats_dir = STATS_DIR
    """Where each shard's stats file (<shard>_stats.json) goes: beside the tar where shards are tars; else in
    a folder of its own, so the metadata folder stays a plain Parquet dataset."""

    def __init__(self, fs, root: str, shard: str, image_format: str, quality: int):
        self.fs, self.root, self.shard = fs, root, shard
        self.image_format, self.quality = image_format, quality
        self.extension = EXTENSIONS[image_format]

    @abstractmethod
    def add(self, key: str, pixels: np.ndarray, meta: dict) -> str:
        """Stage one image; returns its image_key as recorded in the metadata."""

    @abstractmethod
    def commit(self) -> None:
        """Make every added image durable and visible; called once, before the metadata part."""

    @classmethod
    def cleanup(cls, fs, root: str, committed_shards: set[str]) -> int:
        """Remove objects of shards that were never committed; returns how many were removed."""
        return _remove_uncommitted(fs, storage.join(root, cls.stats_dir), STATS_SUFFIX, committed_shards)


def _remove_uncommitted(fs, folder: str, suffix: str, committed_shards: set[str]) -> int:
    removed = 0
    for path in storage.listdir(fs, folder):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(suffix) and name[: -len(suffix)] not in committed_shards:
            fs.rm(path)
            removed += 1
    return removed


class FileSink(ImageSink):
    """One object per image: images/<key>.<ext>, each written atomically."""

    def add(self, key, pixels, meta):
        image_key = f"{IMAGES_DIR}/{key}.{self.extension}"
        storage.atomic_write(self.fs, storage.join(self.root, image_key),
                             encode_image(pixels, self.image_format, self.quality))
        return image_key

    def commit(self):
        pass  # each image was committed by its own atomic write


class WebDatasetSink(ImageSink):
    """Tar shards of <key>.<ext> + <key>.json, as webdataset readers expect; the tar is written atomically."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import webdataset

        self.buffer = io.BytesIO()
        self.tar = webdataset.TarWriter(self.buffer, encoder=False, mtime=0.0)

    def add(self, key, pixels, meta):
        self.tar.write({"__key__": key, self.extension: encode_image(pixels, self.image_format, self.quality),
                        "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
        return key

    def commit(self):
        self.tar.close()
        storage.atomic_write(self.fs, storage.join(self.root, SHARDS_DIR, f"{self.shard}.tar"), self.buffer.getvalue())

    stats_dir = SHARDS_DIR

    @classmethod
    def cleanup(cls, fs, root, committed_shards):
        return super().cleanup(fs, root, committed_shards) + _remove_uncommitted(
            fs, storage.join(root, SHARDS_DIR), ".tar", committed_shards)


SINKS: dict[str, type[ImageSink]] = {"files": FileSink, "webdataset": WebDatasetSink}


class MetadataRows:
    """Turns a batch row into its metadata rows (one per kept image, or one for an error row), adding each
    image to the sink under a key unique per (id, candidate, frame)."""

    def __init__(self, config: Config):
        self.schema = metadata_schema(config)
        self.mode = config.mode if config.image_mode else None
        self.frames = config.frames
        self.row_columns = source_images.source_columns(config.mode) if config.image_mode else {}
        if config.mode == "textdiff":
            self.row_columns[TARGET_PROMPT_COLUMN] = str
        self.embeddings = IMAGE_EMBEDDING_COLUMN in self.schema.names

    def __call__(self, batch: dict[str, np.ndarray], i: int, shard: str, sink: ImageSink | None) -> list[dict]:
        base = {"id": str(batch["id"][i]), "prompt": str(batch["prompt"][i]), "shard": shard,
                "status": str(batch["status"][i]), "error": str(batch["error"][i]) or None,
                "truncated": bool(batch["truncated"][i])}
        if self.mode:
            base["mode"] = self.mode
            for column, kind in self.row_columns.items():
                base[column] = _optional(batch[column][i], kind) if column in batch else None
        seeds = np.asarray(batch["seeds"][i])
        if base["status"] != "ok":
            if "row_seed" in batch:  # the row's own value, even a rejected one; null when int64 cannot hold it
                seed = int(batch["row_seed"][i]) if bool(batch["row_seed_known"][i]) else None
            else:
                seed = int(seeds[0]) if len(seeds) else None
            return [{**base, "seed": seed}]
        kept = np.asarray(batch["candidate"][i]) if "candidate" in batch else np.arange(len(seeds))
        scores = np.asarray(batch["clip_score"][i]) if "clip_score" in batch else None
        all_scores = ([float(s) for s in np.asarray(batch["candidate_scores"][i])]
                      if "candidate_scores" in batch else None)
        pixels_of = np.asarray(batch["image"][i])
        thetas = np.asarray(batch[FRAME_THETA_COLUMN][i]) if FRAME_THETA_COLUMN in batch else None
        row_frames = int(batch[FRAMES_COLUMN][i]) if FRAMES_COLUMN in batch else self.frames
        rows = []
        for position, index in enumerate(kept):
            pixels = pixels_of[position]
            # Image `index` of a row is frame index % frames of candidate (trajectory) index // frames.
            candidate, frame = divmod(int(index), self.frames)
            if frame >= row_frames:  # padding of a row with fewer frames than the run decodes
                continue
            row = {**base, "seed": int(seeds[position]), "candidate": candidate, "rank": len(rows),
                   "clip_score": float(scores[position]) if scores is not None else None,
                   "candidate_scores": all_scores, "height": int(pixels.shape[0]), "width": int(pixels.shape[1])}
            if self.mode:
                row["frame"] = frame
                row["theta"] = float(thetas[frame]) if thetas is not None else None
            if self.embeddings:
                row[IMAGE_EMBEDDING_COLUMN] = np.asarray(batch["image_embeds"][i][position], np.float32).tolist()
            key = f"{safe_key(base['id'])}_{candidate}" + (f"_{frame}" if self.frames > 1 else "")
            meta = {k: v for k, v in row.items() if k not in ("shard", "status", "error")}
            row["image_key"] = sink.add(key, pixels, meta)
            rows.append(row)
        return rows


class FencedOut(RuntimeError):
    """A newer attempt holds the output: this writer's attempt is over and must not commit."""


class ShardWriter:
    """Writes one shard per batch: images through the format's sink, then the metadata part that commits it.

    With an attempt id, a shard commits only while the output's lease names that attempt: the writers of a
    driver that died keep running for a while, and must not land rows a newer attempt is generating again.
    """

    def __init__(self, config: Config, numbers: ShardNumbers | str, attempt: str | None = None):
        """`numbers`: where shard numbers come from: a ShardNumbers when every write happens in this process, or
        the name of the run's progress board, which holds the attempt's one ShardNumbers for all writer tasks."""
        self.output = config.output
        self.storage_options = config.storage_options
        self.attempt = attempt
        self.numbers = numbers
        self.rows_of = MetadataRows(config)

    def _shard(self, ids) -> str:
        digest = rows_digest(ids)
        if isinstance(self.numbers, ShardNumbers):
            return shard_name(self.numbers.number(digest))
        import ray

        return shard_name(ray.get(ray.get_actor(self.numbers).shard_number.remote(digest)))

    def _check_lease(self, fs, root: str) -> None:
        if self.attempt is None:
            return
        holder = read_lease(fs, storage.join(root, LEASE_FILE))
        if holder is None or holder.attempt != self.attempt:
            raise FencedOut(f"attempt {self.attempt} no longer holds output {self.output.path} "
                            f"({holder.describe() if holder else 'no lease'}); not committing")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.time()
        fs, root = storage.filesystem(self.output.path, self.storage_options)
        self._check_lease(fs, root)
        shard = self._shard(batch["id"])
        sink = SINKS[self.output.format](fs, root, shard, self.output.image_format, self.output.quality)
        rows = [row for i in range(len(batch["id"])) for row in self.rows_of(batch, i, shard, sink)]
        sink.commit()
        table = pa.Table.from_pylist(rows, schema=self.rows_of.schema)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        statuses = np.asarray(batch["status"]).astype(object)
        stats = {"shard": shard, "attempt": self.attempt, "rows": len(statuses), "ok": int((statuses == "ok").sum()),
                 "error": int((statuses != "ok").sum()), "images": sum(1 for r in rows if r.get("image_key")),
                 "seconds": round(time.time() - started, 3)}
        storage.atomic_write(fs, storage.join(root, sink.stats_dir, f"{shard}{STATS_SUFFIX}"),
                             json.dumps(stats, sort_keys=True).encode())
        self._check_lease(fs, root)  # again, right before the commit: encoding took a while
        # Written last: its presence is what makes the shard's rows count as done.
        storage.atomic_write(fs, storage.join(root, METADATA_DIR, f"{shard}.parquet"), buffer.getvalue())
        result = {"shard": np.array([shard], dtype=object),
                  **{key: np.array([stats[key]]) for key in ("rows", "ok", "error", "images")}}
        for column, value in merge_stage_counters({}, batch).items():
            result[column] = np.array([value])
        return result
