"""CLIP reranker stage: scores every candidate of a prompt with CLIPModel and keeps the best `rerank.keep`."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from actors.base import GENERATOR_STATE, StageActor, to_uint8_hwc
from actors.image_encoder import SOURCE_EMBEDS
from pipeline import checkpoints


def pixels_uint8(column: str, images: np.ndarray) -> np.ndarray:
    """Candidate images of any stage as uint8 HWC, the form CLIP's image processor takes."""
    if column == "image":  # already the final uint8 HWC image
        return images
    tensor = torch.from_numpy(np.ascontiguousarray(images)).float()
    if column == "image_64":  # decoder output lives in [-1, 1]
        tensor = (tensor * 0.5 + 0.5).clamp(0, 1)
    return to_uint8_hwc(tensor)


def clip_scores(model, tokenizer, image_processor, prompts: list[str], images_uint8: np.ndarray,
                device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """100 x cosine similarity of each prompt with its image, through the checkpoint's own preprocessing."""
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=tokenizer.model_max_length,
                       return_tensors="pt").to(device)
    pixels = image_processor(images=list(images_uint8), return_tensors="pt").pixel_values.to(device, dtype)
    text = model.get_text_features(**tokens)
    image = model.get_image_features(pixel_values=pixels)
    text = getattr(text, "pooler_output", text)
    image = getattr(image, "pooler_output", image)
    text = text / text.norm(dim=-1, keepdim=True)
    image = image / image.norm(dim=-1, keepdim=True)
    return 100.0 * (text * image).sum(-1)


def source_scores(model, image_processor, source_embeds: torch.Tensor, images_uint8: np.ndarray,
                  device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """100 x cosine similarity of each image's CLIP image embedding with its source image's embedding."""
    pixels = image_processor(images=list(images_uint8), return_tensors="pt").pixel_values.to(device, dtype)
    image = model.get_image_features(pixel_values=pixels)
    image = getattr(image, "pooler_output", image).float()
    source = source_embeds.float()
    return 100.0 * torch.nn.functional.cosine_similarity(image, source, dim=-1)


class RerankerActor(StageActor):
    """Scores every candidate of a row and keeps the best `rerank.keep`: against the row's prompt, or (variations
    without captions, options['by'] == 'source') against the embedding of the image they vary."""

    name = "reranker"
    row_inputs = ("prompt",)  # computes in fp32 whatever the run's dtype: see pipeline.config.FP32_STAGES

    def __init__(self, context):
        self.column = context.options["column"]
        self.by_source = context.options.get("by") == "source"
        self.candidate_inputs = (self.column,)
        if self.by_source:
            self.row_inputs, self.drops = (SOURCE_EMBEDS,), (SOURCE_EMBEDS,)
        self.keep = context.config.rerank.keep
        super().__init__(context)

    def load(self) -> None:
        path = self.checkpoint("clip")
        self.model = self.load_component(path, "clip", "model")
        self.tokenizer = self.load_component(path, "clip", "tokenizer")
        self.image_processor = self.load_component(path, "clip", "image_processor")
        self.output_spec = {"candidate_scores": ((), np.dtype(np.float32))}
        encoder_dim = self._image_encoder_dim() if self.by_source else self.model.config.projection_dim
        if encoder_dim != self.model.config.projection_dim:
            raise ValueError(f"models.clip embeds images in {self.model.config.projection_dim} dimensions and the "
                             f"image encoder in {encoder_dim}: score uncaptioned variations with the "
                             "CLIP model the image encoder comes from, or set models.clip to null")

    def _image_encoder_dim(self) -> int | None:
        key = self.config.image_encoder_source
        folder = checkpoints.LAYOUTS[self.config.model_layouts()[key]].components["image_encoder"].subfolder
        with open(os.path.join(self.checkpoint(key), folder, "config.json"), encoding="utf-8") as fh:
            return json.load(fh).get("projection_dim")

    def run(self, inputs, generators):
        if self.by_source:
            sources = self.tensor(inputs[SOURCE_EMBEDS], torch.float32)
            scores = source_scores(self.model, self.image_processor, sources,
                                   pixels_uint8(self.column, inputs[self.column]), self.device, self.dtype)
            return {"candidate_scores": scores.float().cpu().numpy()}
        scores = clip_scores(self.model, self.tokenizer, self.image_processor, [str(p) for p in inputs["prompt"]],
                             pixels_uint8(self.column, inputs[self.column]), self.device, self.dtype)
        return {"candidate_scores": scores.float().cpu().numpy()}

    def __call__(self, batch):
        out = super().__call__(batch)
        scores = out["candidate_scores"]
        # Best first; ties keep the lower candidate index (stable sort), so reruns pick the same images.
        order = np.argsort(-scores, axis=1, kind="stable")[:, : self.keep]
        ok = np.asarray(out["status"]).astype(object) == "ok"
        order[~ok] = np.arange(self.keep)
        for column in ("seeds", GENERATOR_STATE, "image_embeds", self.column):
            if column in out:
                values = np.asarray(out[column])
                index = order.reshape(order.shape + (1,) * (values.ndim - 2))
                out[column] = np.take_along_axis(values, index, axis=1)
        out["candidate"] = order.astype(np.int32)
        out["clip_score"] = np.take_along_axis(scores, order, axis=1).astype(np.float32)
        return out
