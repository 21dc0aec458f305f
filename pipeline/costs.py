"""Stage costs (GPU-seconds per image): a FLOPs model for paper sizes or real checkpoints, and calibration.

The model: one forward pass costs 2 x parameters x activation positions FLOPs; a stage costs that times its
sampling steps, times 2 with classifier-free guidance. Positions are tokens for transformers (text encoder,
prior, CLIP) and H x W / 256 for UNets (most UNet parameters sit in the 1/16-side feature maps). GPU-seconds
= FLOPs / (312 TFLOP/s bf16 peak x 40% utilization). Absolute values are rough; placement only uses the
ratios between stages, and `jobs.bench --plan --calibrate` replaces them with measured ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

EFFECTIVE_FLOPS = 312e12 * 0.40
UNET_POSITION_DIVISOR = 256


@dataclass(frozen=True)
class StageSize:
    params: float
    positions: float
    steps: int
    guidance: bool

    def gpu_seconds(self) -> float:
        return 2 * self.params * self.positions * self.steps * (2 if self.guidance else 1) / EFFECTIVE_FLOPS


def unet_positions(resolution: int) -> float:
    return resolution * resolution / UNET_POSITION_DIVISOR


# DALL-E 2 (Ramesh et al. 2022): prior 1B params, 64 sampling steps, guidance; decoder 3.5B at 64px, 250 steps,
# guidance; upsamplers 700M x 27 steps at 256px and 300M x 15 steps at 1024px, no guidance; CLIP ViT-H/16
# towers (~0.35B text, ~0.63B image) for the text encoder and the reranker.
DALLE2 = {
    "text_encoder": StageSize(0.35e9, 77, 1, False),
    "prior": StageSize(1.0e9, 81, 64, True),
    "decoder": StageSize(3.5e9, unet_positions(64), 250, True),
    "reranker": StageSize(0.63e9, 257, 1, False),
    "upsampler_256": StageSize(0.7e9, unet_positions(256), 27, False),
    "upsampler_1024": StageSize(0.3e9, unet_positions(1024), 15, False),
}

PROFILES = {"dalle2": DALLE2}


def profile_costs(name: str) -> dict[str, float]:
    """GPU-seconds per image of each stage under a named profile."""
    return {stage: size.gpu_seconds() for stage, size in PROFILES[name].items()}


def _count_params(cls, config: dict) -> float:
    from accelerate import init_empty_weights

    with init_empty_weights():  # shapes only: no memory, no weights read
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(cls.config_class(**config))
    return float(sum(p.numel() for p in model.parameters()))


def checkpoint_sizes(config) -> dict[str, StageSize]:
    """The FLOPs model applied to the run's own checkpoints and settings (their config files only)."""
    from pipeline import checkpoints, storage

    models, stages = config.models, config.stages

    def component(source_key: str, name: str) -> tuple[type, dict]:
        source = getattr(models, source_key)
        part = checkpoints.LAYOUTS[source_key].components[name]
        if source.startswith(checkpoints.TINY_SCHEME):
            source = checkpoints.local_dir(source, source_key)
        fs, root = storage.filesystem(source, config.storage_options)
        path = storage.join(root, part.subfolder, "config.json") if part.subfolder else storage.join(root, "config.json")
        return checkpoints._import(part.cls), json.loads(storage.read_bytes(fs, path))

    def sized(source_key, name, positions, steps, guidance, multiplier=1.0) -> StageSize:
        cls, cfg = component(source_key, name)
        return StageSize(_count_params(cls, cfg) * multiplier, positions(cfg), steps, guidance)

    sizes = {
        "text_encoder": sized("unclip", "text_encoder", lambda c: c.get("max_position_embeddings", 77), 1, False),
        "prior": sized("unclip", "prior", lambda c: c.get("num_embeddings", 77) + c.get("additional_embeddings", 4),
                       stages.prior.steps, stages.prior.guidance_scale > 1, multiplier=config.prior.best_of),
        "decoder": sized("unclip", "decoder", lambda c: unet_positions(c["sample_size"]), stages.decoder.steps,
                         stages.decoder.guidance_scale > 1),
        "upsampler_256": sized("unclip", "super_res_first", lambda c: unet_positions(c["sample_size"]),
                               stages.upsampler_256.steps, False),
    }
    if models.upsampler_1024 is not None:
        side = component("unclip", "super_res_first")[1]["sample_size"]  # the x4 latents have the input's size
        sizes["upsampler_1024"] = sized("upsampler_1024", "unet", lambda c: unet_positions(side),
                                        stages.upsampler_1024.steps, stages.upsampler_1024.guidance_scale > 1)
        # Its VAE decodes to 4x the side: one more forward at the output resolution.
        sizes["upsampler_1024_vae"] = sized(
            "upsampler_1024", "vae", lambda c: unet_positions(side * 2 ** (len(c["block_out_channels"]) - 1)), 1, False)
    if models.clip is not None:
        def vision_tokens(c):
            vision = c.get("vision_config", {})
            return (vision.get("image_size", 224) // vision.get("patch_size", 14)) ** 2 + 1

        sizes["reranker"] = sized("clip", "model", vision_tokens, 1, False)
    return sizes


def estimated_costs(config) -> dict[str, float]:
    """GPU-seconds per image of each stage of this run, from its checkpoints' configs and its settings."""
    costs: dict[str, float] = {}
    for part, size in checkpoint_sizes(config).items():
        stage = part.removesuffix("_vae")
        costs[stage] = costs.get(stage, 0.0) + size.gpu_seconds()
    return costs


def calibrate(config, prompts: int = 4, repeats: int = 2) -> dict[str, float]:
    """Measured seconds per image of each stage: the real actors, in this process, on this machine's device."""
    from pipeline.local import prompt_batch, run_stages
    from pipeline.plan import stage_specs
    from pipeline.writer import IMAGES_PREFIX, SECONDS_PREFIX

    n = prompts
    batch = prompt_batch([f"a calibration prompt number {i}" for i in range(n)],
                         np.arange(n * config.rerank.candidates).reshape(n, -1))
    actors: dict = {}
    run_stages(config, dict(batch), use_gpu=True, actors=actors)  # warm-up: kernels, caches, allocator
    measured = {spec.name: float("inf") for spec in stage_specs(config)}
    for _ in range(repeats):
        output = run_stages(config, dict(batch), use_gpu=True, actors=actors)
        _synchronize()
        for name in measured:
            images = max(1, int(output[IMAGES_PREFIX + name].sum()))
            measured[name] = min(measured[name], float(output[SECONDS_PREFIX + name].sum()) / images)
    return measured


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
