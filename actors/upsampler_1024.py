"""1024px upsampler stage: the x4 latent upscaler (VAE + UNet + CLIP text), continuing each candidate's generator."""

from __future__ import annotations

import inspect

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from actors.base import FINAL_IMAGE, StageActor
from pipeline import checkpoints


def encode_upscaler_prompts(tokenizer, text_encoder, prompts: list[str], cfg: bool, device: torch.device):
    """Prompt embeddings as StableDiffusionUpscalePipeline computes them ('' as the negative prompt)."""
    use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))

    def encode(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        mask = tokens.attention_mask.to(device) if use_mask else None
        return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0].to(text_encoder.dtype)

    embeds = encode(prompts)
    return torch.cat([encode([""] * len(prompts)), embeds]) if cfg else embeds


def upscale(components: dict, prompts: list[str], images01: torch.Tensor, generators: list[torch.Generator], *,
            steps: int, guidance_scale: float, noise_level: int) -> torch.Tensor:
    """[0, 1] images -> 4x larger [0, 1] images; generator draws: low-res noise, then latents, then steps."""
    unet, vae, scheduler = components["unet"], components["vae"], components["scheduler"]
    low_res_scheduler = components["low_res_scheduler"]
    cfg = guidance_scale > 1.0
    device = images01.device
    embeds = encode_upscaler_prompts(components["tokenizer"], components["text_encoder"], prompts, cfg, device)
    dtype = embeds.dtype
    image = (2.0 * images01 - 1.0).to(dtype)
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    level = torch.tensor([noise_level], dtype=torch.long, device=device)
    noise = randn_tensor(image.shape, generator=generators, device=device, dtype=dtype)
    image = low_res_scheduler.add_noise(image, noise, level)
    image = torch.cat([image] * 2) if cfg else image
    level = torch.cat([level] * image.shape[0])
    height, width = image.shape[2:]
    latents = randn_tensor((len(generators), vae.config.latent_channels, height, width), generator=generators,
                           device=device, dtype=dtype) * scheduler.init_noise_sigma
    step_parameters = set(inspect.signature(scheduler.step).parameters)
    step_kwargs = {}
    if "eta" in step_parameters:
        step_kwargs["eta"] = 0.0
    if "generator" in step_parameters:
        step_kwargs["generator"] = generators
    for t in timesteps:
        model_input = torch.cat([latents] * 2) if cfg else latents
        model_input = torch.cat([scheduler.scale_model_input(model_input, t), image], dim=1)
        noise_pred = unet(model_input, t, encoder_hidden_states=embeds, class_labels=level).sample
        if cfg:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
    decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (decoded / 2 + 0.5).clamp(0, 1)


class Upsampler1024Actor(StageActor):
    name = "upsampler_1024"
    row_inputs = ("prompt",)
    candidate_inputs = ("image_256", "generator_state")
    drops = ("image_256",)
    uses_generators = True

    def load(self) -> None:
        path = self.checkpoint("upsampler_1024")
        self.components = {name: self.load_component(path, "upsampler_1024", name)
                           for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "low_res_scheduler")}
        vae = self.components["vae"]
        if vae.dtype == torch.float16 and vae.config.force_upcast:
            vae.to(torch.float32)  # the pipeline decodes such VAEs in fp32 (they overflow in fp16)
        # The same check preflight makes, read from the source (a remote copy holds only the components).
        checkpoints.check_noise_level(self.config.models.upsampler_1024, self.settings.noise_level,
                                      self.config.storage_options)
        self.scale = 2 ** (len(self.components["vae"].config.block_out_channels) - 1)
        self.output_spec = {}  # image size depends on the input; set on the first batch

    def _spec_for(self, size: int) -> None:
        channels = self.components["vae"].config.out_channels
        if self.context.final_image:
            self.output_spec[FINAL_IMAGE] = ((size, size, channels), np.dtype(np.uint8))  # after the base's cast
        else:
            self.output_spec["image_1024"] = ((channels, size, size), np.dtype(np.float32))

    def __call__(self, batch):
        if "image_256" in batch:
            self._spec_for(int(np.asarray(batch["image_256"]).shape[-1]) * self.scale)
        return super().__call__(batch)

    def run(self, inputs, generators):
        images = upscale(self.components, [str(p) for p in inputs["prompt"]], self.tensor(inputs["image_256"]),
                         generators, steps=self.settings.steps, guidance_scale=self.settings.guidance_scale,
                         noise_level=self.settings.noise_level)
        return {FINAL_IMAGE if self.context.final_image else "image_1024": images.float().cpu().numpy()}
