"""Decoder stage: UnCLIPTextProjModel + UNet2DConditionModel, image embedding -> 64px image, learned variance."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from actors.base import StageActor
from actors.prior import TEXT_INPUTS, guidance_inputs, unclip_guidance


def sample_decoder(text_proj, decoder, scheduler, text: dict[str, torch.Tensor], image_embeds: torch.Tensor,
                   generators: list[torch.Generator], *, steps: int, guidance_scale: float, cfg: bool) -> torch.Tensor:
    """Decode image embeddings to images in [-1, 1] at the decoder's sample size. `cfg`: see unclip_guidance."""
    embeds, hidden, mask = guidance_inputs(text, cfg)
    hidden, additive_clip_time = text_proj(image_embeddings=image_embeds, prompt_embeds=embeds,
                                           text_encoder_hidden_states=hidden, do_classifier_free_guidance=cfg)
    decoder_mask = F.pad(mask, (text_proj.clip_extra_context_tokens, 0), value=True)
    device, dtype = hidden.device, hidden.dtype
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    size = decoder.config.sample_size
    latents = randn_tensor((len(generators), decoder.config.in_channels, size, size), generator=generators,
                           device=device, dtype=dtype) * scheduler.init_noise_sigma
    for i, t in enumerate(timesteps):
        model_input = torch.cat([latents] * 2) if cfg else latents
        noise_pred = decoder(sample=model_input, timestep=t, encoder_hidden_states=hidden,
                             class_labels=additive_clip_time, attention_mask=decoder_mask).sample
        if cfg:
            uncond, cond = noise_pred.chunk(2)
            uncond, _ = uncond.split(model_input.shape[1], dim=1)
            cond, predicted_variance = cond.split(model_input.shape[1], dim=1)
            noise_pred = torch.cat([uncond + guidance_scale * (cond - uncond), predicted_variance], dim=1)
        prev_timestep = timesteps[i + 1] if i + 1 < len(timesteps) else None
        latents = scheduler.step(noise_pred, t, latents, prev_timestep=prev_timestep, generator=generators).prev_sample
    return latents.clamp(-1, 1)


class DecoderActor(StageActor):
    name = "decoder"
    row_inputs = TEXT_INPUTS
    candidate_inputs = ("image_embeds", "generator_state")
    drops = TEXT_INPUTS + ("image_embeds",)
    uses_generators = True

    def __init__(self, context):
        if context.config.output.save_embeddings:  # carried on to the metadata with the candidates kept
            self.drops = TEXT_INPUTS
        super().__init__(context)

    def load(self) -> None:
        path = self.checkpoint("unclip")
        self.text_proj = self.load_component(path, "unclip", "text_proj")
        self.decoder = self.load_component(path, "unclip", "decoder")
        self.scheduler = self.load_component(path, "unclip", "decoder_scheduler")
        size = self.decoder.config.sample_size
        self.output_spec = {"image_64": ((self.decoder.config.in_channels, size, size), np.dtype(np.float32))}

    def run(self, inputs, generators):
        text = {k: self.tensor(inputs[k], torch.bool if k.endswith("mask") else None) for k in TEXT_INPUTS}
        images = sample_decoder(self.text_proj, self.decoder, self.scheduler, text, self.tensor(inputs["image_embeds"]),
                                generators, steps=self.settings.steps, guidance_scale=self.settings.guidance_scale,
                                cfg=unclip_guidance(self.config))
        return {"image_64": images.float().cpu().numpy()}
