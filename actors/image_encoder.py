"""Image encoder stage (image modes): each row's images -> CLIP image embeddings -> the embedding of every image it decodes."""

from __future__ import annotations

import numpy as np
import torch

from actors.base import GENERATOR_STATE, StageActor
from actors.text_encoder import encode_prompts
from pipeline import images, seeds
from pipeline.config import (FRAME_THETA_COLUMN, FRAMES_COLUMN, IMAGE_EMBEDDING_COLUMN, TARGET_PROMPT_COLUMN,
                             THETA_MAX_COLUMN, theta_max_problem)

TEXT_COLUMNS = ("text_embeds", "text_hidden", "text_mask", "uncond_embeds", "uncond_hidden", "uncond_mask")
SOURCE_EMBEDS = "source_embeds"
"""A variation row's source image embedding, for the reranker to score uncaptioned candidates against."""
PARALLEL_LIMIT = 1e-6
"""Below this sin(omega) two directions count as parallel and slerp falls back to the straight line."""


def slerp(a: np.ndarray, b: np.ndarray, theta: float) -> np.ndarray:
    """Spherical interpolation from a (theta 0) to b (theta 1). The angle is that of the unit vectors; the weights
    apply to a and b as given. Nearly parallel vectors interpolate linearly."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cosine = np.dot(a64 / np.linalg.norm(a64), b64 / np.linalg.norm(b64))
    omega = np.arccos(np.clip(cosine, -1.0, 1.0))
    if np.sin(omega) < PARALLEL_LIMIT:
        return (1 - theta) * a64 + theta * b64
    return (np.sin((1 - theta) * omega) * a64 + np.sin(theta * omega) * b64) / np.sin(omega)


class ImageEncoderActor(StageActor):
    """Fetches and decodes each row's images (an unusable one makes an error row), embeds them with the CLIP image
    encoder (or takes a variation row's `image_embedding`), and hands every image the row decodes its embedding and
    a generator started from its seed:

    - variation: candidate j decodes the image's embedding with seed base + j;
    - interpolation: trajectory m (seed base + m) decodes `frames` slerps from image_a's embedding to image_b's;
    - textdiff: trajectory m decodes `frames` embeddings turned from the image's toward the normalised difference of
      the text embeddings of target_prompt and the caption (`prompt`), up to textdiff.theta_max.

    As in UnCLIPImageVariationPipeline, the decoder's text conditioning is the empty prompt in both guidance halves,
    so that encoding is computed once here and carried per row.
    """

    name = "image_encoder"
    row_inputs = ("pixel_values", "given_embeds", "has_given", "prompt", TARGET_PROMPT_COLUMN)
    per_row = True

    def __init__(self, context):
        config = context.config
        self.mode = config.mode
        self.sources = list(config.source_image_columns)
        self.prefixes = images.source_prefixes(self.mode)
        self.drops = ("pixel_values", "given_embeds", "has_given", IMAGE_EMBEDDING_COLUMN, THETA_MAX_COLUMN,
                      *self.sources, *map(images.kind_column, self.sources))
        super().__init__(context)

    def load(self) -> None:
        key = self.config.image_encoder_source
        path = self.checkpoint(key)
        self.encoder = self.load_component(path, key, "image_encoder")
        self.processor = self.load_component(path, key, "feature_extractor")
        self.dim = int(self.encoder.config.projection_dim)
        unclip = self.checkpoint("unclip")
        self.tokenizer = self.load_component(unclip, "unclip", "tokenizer")
        self.text_encoder = self.load_component(unclip, "unclip", "text_encoder")
        with torch.inference_mode():
            embeds, hidden, mask = encode_prompts(self.tokenizer, self.text_encoder, [""], self.device)
        if self.mode != "textdiff":
            del self.text_encoder  # only the '' encoding is needed
        empty = {"embeds": embeds[0].float().cpu().numpy(), "hidden": hidden[0].float().cpu().numpy(),
                 "mask": mask[0].cpu().numpy()}
        self.empty_text = {column: empty[column.split("_")[1]] for column in TEXT_COLUMNS}
        self.output_spec = {"source_embeds": ((len(self.sources), self.dim), np.dtype(np.float32)),
                            **{c: (v.shape, v.dtype) for c, v in self.empty_text.items()}}
        if self.mode == "textdiff":
            text_dim = (int(embeds.shape[-1]),)
            self.output_spec.update(target_embeds=(text_dim, np.dtype(np.float32)),
                                    caption_embeds=(text_dim, np.dtype(np.float32)))

    def run(self, inputs, generators):
        given = np.asarray(inputs["has_given"], dtype=bool)
        n = len(given)
        embeds = np.asarray(inputs["given_embeds"], dtype=np.float32).reshape(n * len(self.sources), self.dim).copy()
        encode = np.nonzero(~given.reshape(-1))[0]
        if len(encode):
            pixels = np.asarray(inputs["pixel_values"])
            pixels = pixels.reshape((n * len(self.sources),) + pixels.shape[2:])[encode]
            embeds[encode] = self.encoder(self.tensor(pixels)).image_embeds.float().cpu().numpy()
        out = {"source_embeds": embeds.reshape(n, len(self.sources), self.dim),
               **{c: np.repeat(v[None], n, axis=0) for c, v in self.empty_text.items()}}
        if self.mode == "textdiff":
            texts = [str(t) for t in inputs[TARGET_PROMPT_COLUMN]] + [str(p) for p in inputs["prompt"]]
            text_embeds = encode_prompts(self.tokenizer, self.text_encoder, texts, self.device)[0]
            text_embeds = text_embeds.float().cpu().numpy()
            out["target_embeds"], out["caption_embeds"] = text_embeds[:n], text_embeds[n:]
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prepared, theta_max, row_frames = self._prepare(batch)
        out = super().__call__({**batch, **prepared})
        sources = out.pop("source_embeds")
        if self.mode == "variation":  # what uncaptioned variations are scored against
            out[SOURCE_EMBEDS] = sources[:, 0]
        status = np.asarray(out["status"]).astype(object).copy()
        errors = np.asarray(out["error"]).astype(object).copy()
        trajectories = np.asarray(out["seeds"]).shape[1]
        frames = self.config.frames
        per_row = np.zeros((len(status), frames, self.dim), np.float32)
        thetas = np.zeros((len(status), frames), np.float64)
        for i in np.nonzero(status == "ok")[0]:
            thetas[i] = self._thetas(frames, float(theta_max[i]), int(row_frames[i]))
            per_row[i], reason = self._frames(sources[i], out, i, thetas[i])
            if reason is not None:
                status[i], errors[i] = "error", reason
        out.pop("target_embeds", None), out.pop("caption_embeds", None)
        if self.mode != "variation":
            out[FRAME_THETA_COLUMN] = thetas
            out[FRAMES_COLUMN] = row_frames  # typed: the frames each row keeps; the rest are padding
        out["status"], out["error"] = status, errors
        # Image c of a row is frame c % frames of trajectory c // frames, and decodes with that trajectory's seed.
        trajectory_seeds = np.asarray(out["seeds"])
        states = np.asarray([[seeds.generator_state(seeds.new_generator(int(s))) for s in row]
                             for row in trajectory_seeds], dtype=np.uint8)
        states = states.reshape(trajectory_seeds.shape + (seeds.GENERATOR_STATE_BYTES,))
        out["seeds"] = np.repeat(trajectory_seeds, frames, axis=1)
        out[GENERATOR_STATE] = np.repeat(states, frames, axis=1)
        out["image_embeds"] = np.tile(per_row, (1, trajectories, 1))
        return out

    def _thetas(self, frames: int, theta_max: float, row_frames: int) -> np.ndarray:
        """Each frame's theta: k / (row_frames - 1) for interpolation, theta_max times that for textdiff. A row
        with fewer frames than the run decodes is padded with its last frame, which the writer leaves out."""
        if self.mode == "variation":
            return np.zeros(frames)
        steps = np.minimum(np.arange(frames), row_frames - 1) / (row_frames - 1)
        return theta_max * steps if self.mode == "textdiff" else steps

    def _frames(self, sources: np.ndarray, out: dict, i: int, thetas: np.ndarray) -> tuple[np.ndarray, str | None]:
        """The embeddings one trajectory of row i decodes, or a reason the row cannot be decoded."""
        frames = len(thetas)
        if self.mode == "variation":
            return sources[:1], None
        if self.mode == "interpolation":
            return np.stack([slerp(sources[0], sources[1], t) for t in thetas]).astype(np.float32), None
        difference = out["target_embeds"][i].astype(np.float64) - out["caption_embeds"][i].astype(np.float64)
        length = np.linalg.norm(difference)
        if length < PARALLEL_LIMIT:
            return np.zeros((frames, self.dim), np.float32), ("target_prompt and the caption have the same text "
                                                              "embedding: there is no difference to move toward")
        image = sources[0].astype(np.float64)
        scale = np.linalg.norm(image)
        return np.stack([scale * slerp(image / scale, difference / length, t) for t in thetas]).astype(np.float32), None

    def _prepare(self, batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Decoded, preprocessed pixels (or the given embedding) of each row's images and what the metadata records
        of each source image; and each row's theta_max and frame count. Rows with an unusable image (or target
        prompt, theta_max or frames) become error rows with the reason."""
        rows, count = len(batch["status"]), len(self.sources)
        status = np.asarray(batch["status"]).astype(object).copy()
        errors = np.asarray(batch["error"]).astype(object).copy()
        given = np.zeros((rows, count, self.dim), np.float32)
        has_given = np.zeros((rows, count), bool)
        # Typed, "" and 0 for unknown (see images.SOURCE_FIELDS).
        described = {name: np.zeros(rows, np.int32) if kind is int else np.full(rows, "", dtype=object)
                     for name, kind in images.source_columns(self.mode).items()}
        theta_max = np.full(rows, self.config.textdiff.theta_max, np.float64)
        row_frames = np.full(rows, self.config.frames, np.int32)
        decoded: dict[tuple[int, int], object] = {}
        raw_embeddings = batch.get(IMAGE_EMBEDDING_COLUMN)
        targets = batch.get(TARGET_PROMPT_COLUMN)
        row_theta_max = batch.get(THETA_MAX_COLUMN)
        frames_given = batch.get(FRAMES_COLUMN)
        for i in range(rows):
            for column, prefix in zip(self.sources, self.prefixes):
                described[prefix][i] = images.source_label(images.source_value(batch, column, i)) or ""
        for i in np.nonzero(status == "ok")[0]:
            if targets is not None and not isinstance(targets[i], str):
                reason = "target_prompt is null" if targets[i] is None else "target_prompt is not a string"
            else:
                reason = self._row_theta_max(row_theta_max[i], theta_max, i) if row_theta_max is not None else None
            if reason is None and frames_given is not None:
                reason = self._row_frames(frames_given[i], row_frames, i)
            if reason is None and raw_embeddings is not None and raw_embeddings[i] is not None:
                embedding, reason = images.embedding(raw_embeddings[i], self.dim)
                if reason is None:
                    given[i, 0], has_given[i, 0] = embedding, True
            elif reason is None:
                for s, (column, prefix) in enumerate(zip(self.sources, self.prefixes)):
                    value = images.source_value(batch, column, i)
                    image, reason, digest = images.load(value, self.config.storage_options)
                    described[f"{prefix}_sha256"][i] = digest or ""
                    if reason is not None:
                        reason = f"{column}: {reason}" if count > 1 else reason
                        break
                    described[f"{prefix}_width"][i], described[f"{prefix}_height"][i] = image.size
                    decoded[(int(i), s)] = image
            if reason is not None:
                status[i], errors[i] = "error", reason
        size = self.processor.crop_size
        pixels = np.zeros((rows, count, 3, size["height"], size["width"]), np.float32)
        ok = [key for key in sorted(decoded) if status[key[0]] == "ok"]
        if ok:
            processed = self.processor(images=[decoded[key] for key in ok], return_tensors="np").pixel_values
            for key, values in zip(ok, processed):
                pixels[key] = values
        prepared = {"status": status, "error": errors, "pixel_values": pixels, "given_embeds": given,
                    "has_given": has_given, **described}
        if targets is not None:  # handed on to the metadata, typed as above
            prepared[TARGET_PROMPT_COLUMN] = np.array([t if isinstance(t, str) else "" for t in targets], dtype=object)
        return prepared, theta_max, row_frames

    def _row_frames(self, value, row_frames: np.ndarray, i: int) -> str | None:
        """Take row i's own frame count into row_frames[i] (null keeps the configured one); or why it is unusable."""
        value = _given_number(value)
        if value is None:
            return None
        if not 2 <= value <= self.config.frames:
            return (f"frames must be from 2 to {self.mode}.frames={self.config.frames} (the most any row of this "
                    f"run decodes), got {value}; raise {self.mode}.frames to allow more")
        row_frames[i] = int(value)
        return None

    def _row_theta_max(self, value, theta_max: np.ndarray, i: int) -> str | None:
        """Take row i's own theta_max into theta_max[i] (null keeps the configured one); or why it is unusable."""
        value = _given_number(value)
        if value is None:
            return None
        problem = theta_max_problem(value, THETA_MAX_COLUMN)
        if problem is None:
            theta_max[i] = float(value)
        return problem


def _given_number(value):
    """A row's optional number as Python, or None when null (Ray hands an integer column with nulls on as
    floats with NaN)."""
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else value
