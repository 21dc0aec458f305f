"""The diffusers baseline: UnCLIPPipeline + StableDiffusionUpscalePipeline on the same checkpoints, loaded
component by component with diffusers/transformers directly (not through our loader). Tests use it as the
exactness oracle and `benchmarks.bench --tiny` as the speed baseline."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import (PriorTransformer, StableDiffusionUpscalePipeline, UnCLIPPipeline, UnCLIPScheduler,
                       UNet2DConditionModel, UNet2DModel)
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer



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
