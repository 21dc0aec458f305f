"""Prior stage: PriorTransformer + UnCLIPScheduler, CLIP text embedding -> CLIP image embedding per candidate."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from actors.base import StageActor
from pipeline import seeds

TEXT_INPUTS = ("text_embeds", "text_hidden", "text_mask", "uncond_embeds", "uncond_hidden", "uncond_mask")


def unclip_guidance(config) -> bool:
    """Whether the prior, the text projection and the decoder use classifier-free guidance: decided once from
    both scales, as UnCLIPPipeline does, so a scale <= 1 still guides when the other stage's scale is > 1. The
    image modes have no prior, and decide from the decoder's scale, as UnCLIPImageVariationPipeline does."""
    if config.image_mode:
        return config.stages.decoder.guidance_scale > 1.0
    return config.stages.prior.guidance_scale > 1.0 or config.stages.decoder.guidance_scale > 1.0


def guidance_inputs(inputs: dict[str, torch.Tensor], cfg: bool):
    """(embeds, hidden, mask), unconditional first when guidance is on, as UnCLIPPipeline batches them."""
    if not cfg:
        return inputs["text_embeds"], inputs["text_hidden"], inputs["text_mask"]
    return (torch.cat([inputs["uncond_embeds"], inputs["text_embeds"]]),
            torch.cat([inputs["uncond_hidden"], inputs["text_hidden"]]),
            torch.cat([inputs["uncond_mask"], inputs["text_mask"]]))


def sample_prior(prior, scheduler, text: dict[str, torch.Tensor], generators: list[torch.Generator], *,
                 steps: int, guidance_scale: float, cfg: bool) -> torch.Tensor:
    """Sample one image embedding per generator; text tensors have one row per generator. `cfg`: see
    unclip_guidance."""
    embeds, hidden, mask = guidance_inputs(text, cfg)
    device, dtype = embeds.device, embeds.dtype
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    latents = randn_tensor((len(generators), prior.config.embedding_dim), generator=generators, device=device,
                           dtype=dtype) * scheduler.init_noise_sigma
    for i, t in enumerate(timesteps):
        model_input = torch.cat([latents] * 2) if cfg else latents
        predicted = prior(model_input, timestep=t, proj_embedding=embeds, encoder_hidden_states=hidden,
                          attention_mask=mask).predicted_image_embedding
        if cfg:
            uncond, cond = predicted.chunk(2)
            predicted = uncond + guidance_scale * (cond - uncond)
        prev_timestep = timesteps[i + 1] if i + 1 < len(timesteps) else None
        latents = scheduler.step(predicted, timestep=t, sample=latents, generator=generators,
                                 prev_timestep=prev_timestep).prev_sample
    return prior.post_process_latents(latents)


class PriorActor(StageActor):
    name = "prior"
    row_inputs = TEXT_INPUTS
    candidate_inputs = ("seeds",)
    uses_generators = True

    def load(self) -> None:
        path = self.checkpoint("unclip")
        self.prior = self.load_component(path, "unclip", "prior")
        self.scheduler = self.load_component(path, "unclip", "prior_scheduler")
        self.best_of = self.config.prior.best_of
        self.output_spec = {"image_embeds": ((self.prior.config.embedding_dim,), np.dtype(np.float32))}

    def run(self, inputs, generators):
        text = {k: self.tensor(inputs[k], torch.bool if k.endswith("mask") else None) for k in TEXT_INPUTS}
        m = self.best_of
        if m > 1:
            # Sample 0 consumes the candidate's own generator (so it equals the reference); 1..m-1 derive theirs.
            extra = [seeds.new_generator(seeds.best_of_seed(int(s), i)) for i in range(1, m) for s in inputs["seeds"]]
            text = {k: v.repeat((m,) + (1,) * (v.dim() - 1)) for k, v in text.items()}
            samples = sample_prior(self.prior, self.scheduler, text, list(generators) + extra,
                                   steps=self.settings.steps, guidance_scale=self.settings.guidance_scale,
                                   cfg=unclip_guidance(self.config))
            n = len(generators)
            samples = samples.reshape(m, n, -1)
            # DALL-E 2: keep the sample with the highest dot product with the text embedding.
            score = (samples.float() * text["text_embeds"][:n].float()[None]).sum(-1)
            embeds = samples[score.argmax(0), torch.arange(n, device=samples.device)]
        else:
            embeds = sample_prior(self.prior, self.scheduler, text, generators, steps=self.settings.steps,
                                  guidance_scale=self.settings.guidance_scale, cfg=unclip_guidance(self.config))
        return {"image_embeds": embeds.float().cpu().numpy()}
