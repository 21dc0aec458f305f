"""Source images of the image modes: every unusable value is a one-line reason, never an exception."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from pipeline import images


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_bytes_and_paths_decode_to_rgb_as_stored(tmp_path):
    gray = png(5, 3, "L")
    (tmp_path / "a.png").write_bytes(gray)
    for value in (gray, str(tmp_path / "a.png"), f"file://{tmp_path / 'a.png'}"):
        image, reason, _ = images.load(value)
        assert reason is None and image.mode == "RGB" and image.size == (5, 3)


@pytest.mark.parametrize("value,reason", [
    (None, r"^image is null$"),
    (b"", r"^image bytes is empty \(0 bytes\)$"),
    (b"definitely not an image", r"^image bytes is not in an image format Pillow can read"),
    (png(9, 9)[:40], r"^image bytes is not in an image format Pillow can read"),
    (lambda: noise_jpeg()[:600], r"^image bytes cannot be decoded as an image \(OSError: "),
    ("", r"^image path is empty$"),
    (12, r"^image is int, expected encoded image bytes or a path / URL"),
    # 8001 x 8001 = 64.016 megapixels: refused from the header, before any pixel is decoded.
    (png(8001, 8001, "1"), r"^image bytes is 8001x8001, more than 64 megapixels; downscale it first$"),
])
def test_unusable_values_are_reasons(value, reason):
    image, why, _ = images.load(value() if callable(value) else value)
    assert image is None
    assert why is not None and "\n" not in why
    assert re.search(reason, why), why


def test_missing_and_empty_files_name_the_path(tmp_path):
    assert images.load(str(tmp_path / "nope.png")) == (None, f"image {tmp_path / 'nope.png'} does not exist", None)
    (tmp_path / "zero.png").write_bytes(b"")
    assert images.load(str(tmp_path / "zero.png")) == (None, f"image {tmp_path / 'zero.png'} is empty (0 bytes)", None)


def test_given_embeddings_are_checked():
    good, reason = images.embedding([0.5] * 4, 4)
    assert reason is None and good.dtype == np.float32 and good.shape == (4,)
    assert images.embedding([1.0] * 3, 4)[1] == ("image_embedding has 3 values, expected 4 (the image encoder's "
                                                  "projection size)")
    assert images.embedding([1.0, float("nan"), 0, 0], 4)[1] == "image_embedding holds NaN or infinite values"
    assert "not a list of numbers" in images.embedding(["a", "b"], 2)[1]
