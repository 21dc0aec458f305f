"""Image encoder stage (image modes): each row's image -> CLIP image embedding, fanned out to its candidates."""

from __future__ import annotations

import numpy as np
import torch

from actors.base import GENERATOR_STATE, StageActor
from actors.text_encoder import encode_prompts
from pipeline import images, seeds
from pipeline.config import IMAGE_EMBEDDING_COLUMN

TEXT_COLUMNS = ("text_embeds", "text_hidden", "text_mask", "uncond_embeds", "uncond_hidden", "uncond_mask")


class ImageEncoderActor(StageActor):
    """Fetches and decodes each row's image (a bad one makes an error row), embeds it with the CLIP image
    encoder (or takes the row's `image_embedding`), and hands every candidate of the row that embedding and a
    generator started from its seed. As in UnCLIPImageVariationPipeline, the decoder's text conditioning is the
    empty prompt in both guidance halves, so that encoding is computed once here and carried per row."""

    name = "image_encoder"
    row_inputs = ("pixel_values", "given_embeds", "has_given")
    per_row = True

    def __init__(self, context):
        self.image_column = context.config.input.image_column
        self.drops = ("pixel_values", "given_embeds", "has_given", self.image_column, IMAGE_EMBEDDING_COLUMN)
        super().__init__(context)

    def load(self) -> None:
        key = "image_encoder" if self.config.models.image_encoder is not None else "unclip"
        path = self.checkpoint(key)
        self.encoder = self.load_component(path, key, "image_encoder")
        self.processor = self.load_component(path, key, "feature_extractor")
        self.dim = int(self.encoder.config.projection_dim)
        unclip = self.checkpoint("unclip")
        tokenizer = self.load_component(unclip, "unclip", "tokenizer")
        text_encoder = self.load_component(unclip, "unclip", "text_encoder")
        with torch.inference_mode():
            embeds, hidden, mask = encode_prompts(tokenizer, text_encoder, [""], self.device)
        del text_encoder  # only the '' encoding is needed
        empty = {"embeds": embeds[0].float().cpu().numpy(), "hidden": hidden[0].float().cpu().numpy(),
                 "mask": mask[0].cpu().numpy()}
        self.empty_text = {column: empty[column.split("_")[1]] for column in TEXT_COLUMNS}
        self.output_spec = {"source_embeds": ((self.dim,), np.dtype(np.float32)),
                            **{c: (v.shape, v.dtype) for c, v in self.empty_text.items()}}

    def run(self, inputs, generators):
        given = np.asarray(inputs["has_given"], dtype=bool)
        embeds = np.asarray(inputs["given_embeds"], dtype=np.float32).copy()
        if not given.all():
            encode = np.nonzero(~given)[0]
            pixels = self.tensor(np.asarray(inputs["pixel_values"])[encode])
            embeds[encode] = self.encoder(pixels).image_embeds.float().cpu().numpy()
        n = len(given)
        return {"source_embeds": embeds, **{c: np.repeat(v[None], n, axis=0) for c, v in self.empty_text.items()}}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = {**batch, **self._prepare(batch)}
        out = super().__call__(batch)
        # Every candidate decodes the row's embedding; its generator starts from its own seed (no prior draws).
        candidate_seeds = np.asarray(out["seeds"])
        out["image_embeds"] = np.repeat(out.pop("source_embeds")[:, None], candidate_seeds.shape[1], axis=1)
        out[GENERATOR_STATE] = np.stack([np.stack([seeds.generator_state(seeds.new_generator(int(s))) for s in row])
                                         for row in candidate_seeds]) if len(candidate_seeds) else \
            np.zeros((0, candidate_seeds.shape[1], seeds.GENERATOR_STATE_BYTES), np.uint8)
        return out

    def _prepare(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Decoded, preprocessed pixels (or the given embedding) per row; rows whose image is unusable become
        error rows with the reason."""
        rows = len(batch["status"])
        status = np.asarray(batch["status"]).astype(object).copy()
        errors = np.asarray(batch["error"]).astype(object).copy()
        given = np.zeros((rows, self.dim), np.float32)
        has_given = np.zeros(rows, bool)
        decoded: dict[int, object] = {}
        raw_embeddings = batch.get(IMAGE_EMBEDDING_COLUMN)
        raw_images = batch.get(self.image_column)
        for i in np.nonzero(status == "ok")[0]:
            if raw_embeddings is not None and raw_embeddings[i] is not None:
                embedding, reason = images.embedding(raw_embeddings[i], self.dim)
                if reason is None:
                    given[i], has_given[i] = embedding, True
            else:
                image, reason = images.load(None if raw_images is None else raw_images[i],
                                            self.config.storage_options)
                if reason is None:
                    decoded[int(i)] = image
            if reason is not None:
                status[i], errors[i] = "error", reason
        size = self.processor.crop_size
        pixels = np.zeros((rows, 3, size["height"], size["width"]), np.float32)
        if decoded:
            order = sorted(decoded)
            pixels[order] = self.processor(images=[decoded[i] for i in order], return_tensors="np").pixel_values
        return {"status": status, "error": errors, "pixel_values": pixels, "given_embeds": given,
                "has_given": has_given}
