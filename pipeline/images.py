"""Source images of the image modes: encoded bytes or a path / fsspec URL in; an RGB image or a one-line reason out."""

from __future__ import annotations

import hashlib
import io
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image

from pipeline import storage

MAX_PIXELS = 64_000_000
"""Larger images are refused before they are decoded: a small file can decode to gigabytes (a decompression bomb)."""


SOURCE_FIELDS = {"": str, "_sha256": str, "_width": int, "_height": int}
"""Metadata of each source image, by suffix after its prefix, with its kind: where it came from (the path / URL,
or `bytes`), the SHA-256 of its encoded bytes, and its size in pixels. Unknown is "" or 0 between stages (a column
of only nulls would change type on its way through Ray) and null in the metadata."""


def source_prefixes(mode: str) -> tuple[str, ...]:
    """The metadata prefix of each source image of a row: `source`, or `source_a` and `source_b`."""
    return ("source_a", "source_b") if mode == "interpolation" else ("source",)


def source_columns(mode: str) -> dict[str, type]:
    """Every source-image metadata column of a mode, with its kind (str or int)."""
    return {prefix + suffix: kind for prefix in source_prefixes(mode) for suffix, kind in SOURCE_FIELDS.items()}


NO_IMAGE, IMAGE_BYTES, IMAGE_LOCATION = 0, 1, 2
"""What an image column's `kind_column` says a row holds: no image (null), encoded bytes, a path / URL."""


def kind_column(column: str) -> str:
    """The int8 column that travels beside an image column between the reader and the image encoder."""
    return f"{column}_kind"


def carried(values: list) -> tuple[np.ndarray, np.ndarray]:
    """One image column's values as they travel through Ray: (data, kinds), the data as bytes (a path / URL
    UTF-8 encoded, b"" for none) and its kind (NO_IMAGE, IMAGE_BYTES or IMAGE_LOCATION).

    A Parquet column is either string (paths / URLs) or binary (encoded bytes), and a batch may merge rows of
    files of both kinds (Ray then gives the merged column one type: paths would arrive as bytes); a column of
    only nulls may arrive as floats. One binary column and one integer column keep their types whatever merges."""
    data = np.full(len(values), b"", dtype=object)
    kinds = np.full(len(values), NO_IMAGE, dtype=np.int8)
    for i, value in enumerate(values):
        if isinstance(value, str):
            data[i], kinds[i] = value.encode("utf-8"), IMAGE_LOCATION
        elif isinstance(value, (bytes, bytearray, memoryview)):
            data[i], kinds[i] = bytes(value), IMAGE_BYTES
    return data, kinds


def source_value(batch: dict, column: str, i: int):
    """Row i's image as the input gave it (see `carried`): its encoded bytes, its path / URL, or None (also when
    the input has no such column: a variation input may give only image embeddings)."""
    kinds = batch.get(kind_column(column))
    kind = NO_IMAGE if kinds is None else int(kinds[i])
    if kind == IMAGE_BYTES:
        return bytes(batch[column][i])
    return bytes(batch[column][i]).decode("utf-8") if kind == IMAGE_LOCATION else None


def source_label(value) -> str | None:
    """Where an input image came from, as recorded: its path / URL, `bytes`, or None (no image)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes"
    return value if isinstance(value, str) else None


def _detail(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else "no detail"
    return f"{type(exc).__name__}: {text}"


def fetch(value, storage_options: dict | None = None) -> tuple[bytes | None, str | None]:
    """(the encoded image, None), or (None, why it cannot be had)."""
    if value is None or (isinstance(value, float) and value != value):  # NaN: how a null can come out of Ray
        return None, "image is null"
    if isinstance(value, (bytes, bytearray, memoryview)):
        data, where = bytes(value), "image bytes"
    elif isinstance(value, str):
        if not value.strip():
            return None, "image path is empty"
        try:
            fs, path = storage.filesystem(value, storage_options)
            data = storage.read_bytes(fs, path)
        except FileNotFoundError:
            return None, f"image {value} does not exist"
        except Exception as exc:  # noqa: BLE001 - every backend's error is this row's reason, not the run's
            return None, f"image {value} cannot be read ({_detail(exc)})"
        where = f"image {value}"
    else:
        return None, f"image is {type(value).__name__}, expected encoded image bytes or a path / URL to an image"
    if not data:
        return None, f"{where} is empty (0 bytes)"
    return data, None


def decode(data: bytes, where: str = "image") -> tuple[Image.Image | None, str | None]:
    """(the image as RGB, None), or (None, why it cannot be decoded). Pixels as stored: no EXIF rotation."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below instead
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    return None, (f"{where} is {width}x{height}, more than {MAX_PIXELS // 1_000_000} megapixels; "
                                  "downscale it first")
                image.load()
                return image.convert("RGB"), None
    except Image.UnidentifiedImageError:
        return None, f"{where} is not in an image format Pillow can read (corrupt, or not an image)"
    except Image.DecompressionBombError as exc:
        return None, f"{where} is too large to decode safely ({_detail(exc)}); downscale it first"
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt or truncated data
        return None, f"{where} cannot be decoded as an image ({_detail(exc)})"


class Loaded(NamedTuple):
    image: Image.Image | None
    """The image as RGB, or None when it cannot be had."""
    reason: str | None
    """Why there is no image (one line), or None."""
    sha256: str | None = None
    """SHA-256 of the encoded bytes, when they could be fetched."""


def load(value, storage_options: dict | None = None) -> Loaded:
    """Fetch and decode one input image value; a reason instead of the image for an error row."""
    data, reason = fetch(value, storage_options)
    if reason is not None:
        return Loaded(None, reason)
    image, reason = decode(data, f"image {value}" if isinstance(value, str) else "image bytes")
    return Loaded(image, reason, hashlib.sha256(data).hexdigest())


def embedding(value, dim: int) -> tuple[np.ndarray | None, str | None]:
    """A given image embedding as float32, or why it is unusable (length, non-numbers, non-finite values)."""
    try:
        array = np.asarray(value, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        return None, f"image_embedding is not a list of numbers (got {type(value).__name__})"
    if array.shape != (dim,):
        return None, f"image_embedding has {array.size} values, expected {dim} (the image encoder's projection size)"
    if not np.isfinite(array).all():
        return None, "image_embedding holds NaN or infinite values"
    return array, None
