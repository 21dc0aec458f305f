"""256px upsampler stage: Karlo's super_res_first / super_res_last UNet2DModel pair on a bicubic-upsampled input."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from actors.base import FINAL_IMAGE, StageActor


def super_resolve(super_res_first, super_res_last, scheduler, image_small: torch.Tensor,
                  generators: list[torch.Generator], *, steps: int) -> torch.Tensor:
    """64px images in [-1, 1] -> super-resolved images in [0, 1]."""
    device, dtype = image_small.device, image_small.dtype
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    channels = super_res_first.config.in_channels // 2
    size = super_res_first.config.sample_size
    latents = randn_tensor((len(generators), channels, size, size), generator=generators, device=device,
                           dtype=dtype) * scheduler.init_noise_sigma
    upscaled = F.interpolate(image_small, size=[size, size], mode="bicubic", align_corners=False, antialias=True)
    for i, t in enumerate(timesteps):
        # super_res_first for every step but the last, as Karlo was trained.
        unet = super_res_last if i == len(timesteps) - 1 else super_res_first
        noise_pred = unet(sample=torch.cat([latents, upscaled], dim=1), timestep=t).sample
        prev_timestep = timesteps[i + 1] if i + 1 < len(timesteps) else None
        latents = scheduler.step(noise_pred, t, latents, prev_timestep=prev_timestep, generator=generators).prev_sample
    return (latents * 0.5 + 0.5).clamp(0, 1)


class Upsampler256Actor(StageActor):
    name = "upsampler_256"
    candidate_inputs = ("image_64", "generator_state")
    drops = ("image_64",)
    uses_generators = True

    def load(self) -> None:
        path = self.checkpoint("unclip")
        self.first = self.load_component(path, "unclip", "super_res_first")
        self.last = self.load_component(path, "unclip", "super_res_last")
        self.scheduler = self.load_component(path, "unclip", "super_res_scheduler")
        size, channels = self.first.config.sample_size, self.first.config.out_channels
        if self.context.final_image:
            self.output_spec = {FINAL_IMAGE: ((size, size, channels), np.dtype(np.uint8))}  # after the base's cast
        else:
            self.output_spec = {"image_256": ((channels, size, size), np.dtype(np.float32))}

    def run(self, inputs, generators):
        images = super_resolve(self.first, self.last, self.scheduler, self.tensor(inputs["image_64"]), generators,
                               steps=self.settings.steps)
        return {FINAL_IMAGE if self.context.final_image else "image_256": images.float().cpu().numpy()}
