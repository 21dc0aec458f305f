"""The diffusers baseline: UnCLIPPipeline (UnCLIPImageVariationPipeline for variations) + StableDiffusionUpscalePipeline
on the same checkpoints, loaded
component by component with diffusers/transformers directly (not through our loader). Tests use it as the
exactness oracle and `benchmarks.bench --tiny` as the speed baseline."""

from __future__ import annotations

import os

import numpy as np
import torch
from diffusers import (PriorTransformer, StableDiffusionUpscalePipeline, UnCLIPPipeline, UnCLIPScheduler,
                       UNet2DConditionModel, UNet2DModel)
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
from diffusers.pipelines.deprecated.unclip.pipeline_unclip_image_variation import UnCLIPImageVariationPipeline
from transformers import CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection



class Reference:
    def __init__(self, unclip_dir: str, upscaler_dir: str | None):
        # Component by component: UnCLIPPipeline.from_pretrained cannot resolve UnCLIPTextProjModel any more.
        def sub(cls, name):
            return cls.from_pretrained(unclip_dir, subfolder=name)

        self.unclip = UnCLIPPipeline(
            prior=sub(PriorTransformer, "prior"), decoder=sub(UNet2DConditionModel, "decoder"),
            text_encoder=sub(CLIPTextModelWithProjection, "text_encoder"), tokenizer=sub(CLIPTokenizer, "tokenizer"),
            text_proj=sub(UnCLIPTextProjModel, "text_proj"), super_res_first=sub(UNet2DModel, "super_res_first"),
            super_res_last=sub(UNet2DModel, "super_res_last"), prior_scheduler=sub(UnCLIPScheduler, "prior_scheduler"),
            decoder_scheduler=sub(UnCLIPScheduler, "decoder_scheduler"),
            super_res_scheduler=sub(UnCLIPScheduler, "super_res_scheduler"),
        )
        self.unclip.set_progress_bar_config(disable=True)
        self.variations = None
        if os.path.isdir(os.path.join(unclip_dir, "image_encoder")):
            parts = self.unclip.components
            self.variations = UnCLIPImageVariationPipeline(
                decoder=parts["decoder"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                text_proj=parts["text_proj"], feature_extractor=sub(CLIPImageProcessor, "feature_extractor"),
                image_encoder=sub(CLIPVisionModelWithProjection, "image_encoder"),
                super_res_first=parts["super_res_first"], super_res_last=parts["super_res_last"],
                decoder_scheduler=parts["decoder_scheduler"], super_res_scheduler=parts["super_res_scheduler"],
            )
            self.variations.set_progress_bar_config(disable=True)
        self.upscaler = None
        if upscaler_dir is not None:
            self.upscaler = StableDiffusionUpscalePipeline.from_pretrained(upscaler_dir)
            self.upscaler.set_progress_bar_config(disable=True)

    def image(self, prompt: str, seed: int, *, prior_steps: int, decoder_steps: int, super_res_steps: int,
              prior_guidance: float = 4.0, decoder_guidance: float = 8.0, upscale_steps: int | None = None,
              upscale_guidance: float = 9.0, noise_level: int = 20) -> np.ndarray:
        """uint8 HWC image for one prompt and seed; continues the same generator into the x4 upscaler if asked.
        The generator is a CPU one, as the seed contract says, whatever device the pipelines run on."""
        generator = [torch.Generator("cpu").manual_seed(seed)]
        image = self.unclip(prompt, generator=generator, prior_num_inference_steps=prior_steps,
                            decoder_num_inference_steps=decoder_steps, super_res_num_inference_steps=super_res_steps,
                            prior_guidance_scale=prior_guidance, decoder_guidance_scale=decoder_guidance,
                            output_type="np").images
        if upscale_steps is not None:
            image = self.upscaler(prompt=prompt, image=torch.from_numpy(image).permute(0, 3, 1, 2),
                                  generator=generator, num_inference_steps=upscale_steps,
                                  guidance_scale=upscale_guidance, noise_level=noise_level, output_type="np").images
        return (image[0] * 255).round().astype(np.uint8)

    def variation(self, seed: int, *, image=None, image_embeddings=None, decoder_steps: int, super_res_steps: int,
                  decoder_guidance: float = 8.0, upscale_steps: int | None = None, upscale_guidance: float = 9.0,
                  noise_level: int = 20) -> np.ndarray:
        """uint8 HWC variation of one PIL image (or of a raw CLIP image embedding) for one seed; the x4 upscaler,
        if asked, continues the same generator with the empty prompt."""
        generator = torch.Generator("cpu").manual_seed(seed)
        if image_embeddings is not None:
            image_embeddings = torch.as_tensor(np.asarray(image_embeddings, np.float32)).reshape(1, -1)
        image_out = self.variations(image=image, image_embeddings=image_embeddings, generator=generator,
                                    decoder_num_inference_steps=decoder_steps,
                                    super_res_num_inference_steps=super_res_steps,
                                    decoder_guidance_scale=decoder_guidance, output_type="np").images
        if upscale_steps is not None:
            image_out = self.upscaler(prompt="", image=torch.from_numpy(image_out).permute(0, 3, 1, 2),
                                      generator=generator, num_inference_steps=upscale_steps,
                                      guidance_scale=upscale_guidance, noise_level=noise_level,
                                      output_type="np").images
        return (image_out[0] * 255).round().astype(np.uint8)
