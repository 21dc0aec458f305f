"""GPU benchmark: Karlo-size random-weight models in the product's stage actors, at its defaults, vs diffusers."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

from pipeline.config import STAGE_NAMES

# Shapes of the real checkpoints, built in code with seeded random weights (nothing is downloaded or saved).
# Karlo (kakaobrain/karlo-v1-alpha): decoder and super-res follow diffusers'
# scripts/convert_kakao_brain_unclip_to_diffusers.py; the prior uses PriorTransformer's defaults, which that
# script also uses (32 heads x 64 = 2048 wide, 20 layers, CLIP dim 768); the text tower is CLIP ViT-L/14's.
KARLO_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
KARLO_PRIOR = dict(num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=768,
                   num_embeddings=77, additional_embeddings=4)
KARLO_TEXT_PROJ = dict(clip_extra_context_tokens=4, clip_embeddings_dim=768, time_embed_dim=4 * 320,
                       cross_attention_dim=1536)
KARLO_DECODER = dict(
    sample_size=64, in_channels=3, out_channels=6, layers_per_block=3,
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(320, 640, 960, 1280),
    cross_attention_dim=1536, attention_head_dim=64, resnet_time_scale_shift="scale_shift",
    class_embed_type="identity",
)
KARLO_SUPER_RES = dict(
    sample_size=256, in_channels=6, out_channels=3, layers_per_block=3,
    down_block_types=("ResnetDownsampleBlock2D",) * 4, up_block_types=("ResnetUpsampleBlock2D",) * 4,
    block_out_channels=(320, 640, 960, 1280), add_attention=False,
)
# stabilityai/stable-diffusion-x4-upscaler (from its published configs, written from memory: see CAVEATS).
X4_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
               num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
X4_UNET = dict(
    sample_size=128, in_channels=7, out_channels=4, layers_per_block=2, block_out_channels=(256, 512, 512, 1024),
    down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
    attention_head_dim=8, cross_attention_dim=1024, num_class_embeds=1000,
    only_cross_attention=(True, True, True, False), use_linear_projection=True,
)
X4_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512), layers_per_block=2,
              down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
              scaling_factor=0.08333, sample_size=256)

# --small: the same classes and wiring at toy widths, so the script itself can be checked on a CPU.
SMALL = {
    "text": dict(KARLO_TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=64),
    "prior": dict(KARLO_PRIOR, num_attention_heads=2, attention_head_dim=32, num_layers=2, embedding_dim=64),
    "text_proj": dict(KARLO_TEXT_PROJ, clip_embeddings_dim=64, time_embed_dim=4 * 32, cross_attention_dim=64),
    "decoder": dict(KARLO_DECODER, sample_size=16, layers_per_block=1, block_out_channels=(32, 64),
                    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), cross_attention_dim=64,
                    attention_head_dim=16),
    "super_res": dict(KARLO_SUPER_RES, sample_size=64, layers_per_block=1, block_out_channels=(32, 64),
                      down_block_types=("ResnetDownsampleBlock2D",) * 2, up_block_types=("ResnetUpsampleBlock2D",) * 2),
    "x4_text": dict(X4_TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    projection_dim=64),
    "x4_unet": dict(X4_UNET, layers_per_block=1, block_out_channels=(32, 32, 64),
                    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                    only_cross_attention=False),
    "x4_vae": dict(X4_VAE, block_out_channels=(32, 32, 64), layers_per_block=1),
}
FULL = {"text": KARLO_TEXT, "prior": KARLO_PRIOR, "text_proj": KARLO_TEXT_PROJ, "decoder": KARLO_DECODER,
        "super_res": KARLO_SUPER_RES, "x4_text": X4_TEXT, "x4_unet": X4_UNET, "x4_vae": X4_VAE}

CAVEATS = [
    "Random weights: speed only, the images are noise. Weight values do not change the kernels that run.",
    "Karlo decoder / super-res / prior shapes follow diffusers' Karlo conversion script; super_res_first/last use "
    "its resnet_time_scale_shift default ('default'), which may differ from the hub config (changes <0.1% of FLOPs).",
    "x4 upscaler shapes (UNet 256/512/512/1024, cross-attention-only levels, VAE 128/256/512, OpenCLIP-H text 23x1024) "
    "are written from memory of stabilityai/stable-diffusion-x4-upscaler's configs, not read from the hub.",
    "The tokenizer is the tiny preset's byte-level CLIP BPE (real vocab files cannot be downloaded here); prompts are "
    "padded to 77 tokens as with the real one, so model cost is the same; CPU tokenization cost may differ slightly.",
    "upsampler_1024 is timed at two small step counts and extrapolated linearly to its configured steps "
    "(every step is the same UNet pair; the fixed part is text encoding, noising and the VAE decode).",
    "The diffusers baseline is UnCLIPPipeline only (text -> prior -> decoder -> 256px): the 1024 stage has no "
    "baseline and is compared only through our own end-to-end 1024 figure. Reranking (models.clip) is off.",
    "Our stages run in --dtype, by default the product's: dtype 'auto', which is fp16 on a GPU (fp32 on the CPU "
    "self-check). Modules are built in that dtype and handed to the actors' own load(), so whatever the actors do "
    "on loading (upsampler_1024 keeps an fp16 VAE with force_upcast in fp32) happens here too; the dtypes each "
    "module actually ran in are listed below and in each stage record ('module_dtypes').",
    "The baseline runs the same modules in --baseline-dtype (default: ours), with the same steps and guidance and "
    "one generator per prompt of the kind the product uses (see 'generators').",
    "images/s counts only rows the stage returned with status 'ok' (one image per row here); a row turned into an "
    "error row (e.g. NaN/inf output) adds nothing. ok_rows is the fewest over the timed calls.",
    "peak_gib is the whole process (every stage's weights stay resident); peak_gib_alone = the stage's own weights "
    "+ (max_memory_allocated during a call - memory_allocated just before it), the most over the warm-up and timed "
    "calls. Neither includes the CUDA context (~0.3-0.5 GiB per process) or memory cached by the allocator.",
    "Cost fit (--profile-json): seconds_per_image c and batch_overhead_s a from a least-squares line t(b) = a + b*c "
    "through the batch sizes that ran whole (every row ok, no out-of-memory halving), refitted through the origin "
    "if a < 0; weights_gb = the stage's weight bytes; activation_gb_per_image = least-squares slope of peak_gib_alone "
    "over batch size (its intercept above the weights, memory a call needs whatever its size, is recorded per "
    "stage as fixed_gb but is not in the profile). All memory figures are GiB (2^30 bytes).",
    "End-to-end 'bound' = 1 / sum(1 / rate_s) over stages at each stage's best batch: one GPU time-sliced between "
    "stages with no idle time, which is what the planner packs actor pools towards.",
]

DEFAULT_BATCHES = {
    "text_encoder": (1, 4, 8, 16, 32, 64, 128, 256),
    "prior": (1, 4, 8, 16, 32, 64, 128, 256),
    "decoder": (1, 4, 8, 16, 32, 64),
    "upsampler_256": (1, 4, 8, 16, 32, 64),
    "upsampler_1024": (1, 2, 4, 8, 16),
}
BASELINE_BATCHES = (1, 4, 8, 16, 32, 64)
QUICK_BATCHES = (1, 2)
PILOT_ROWS = 2
WARM_STEPS = 2  # UnCLIPScheduler needs at least 2 steps
OURS_BUDGET_SHARE = 0.7  # our sweeps stop early enough to leave the baseline its share of --budget-s
PROMPT = "a high-resolution photograph of a big red frog on a green leaf, number {}"
PIXEL_PROMPT = "an oil painting of a lighthouse at dusk, seen from the sea, variant {}"
PIXEL_FIRST_SEED = 1234
PIXEL_CHAIN = STAGE_NAMES[: STAGE_NAMES.index("upsampler_256") + 1]
"""The stages up to the 256 px image, in run order."""
# The product's exactness tolerance against diffusers.
PIXEL_MIN_PSNR_DB = 40.0
PIXEL_MIN_WITHIN_2_LEVELS = 0.99
GIB = 2**30
DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# GPU kinds the product's planner has figures for: (kind, name pattern, GiB range torch reports for that card).
# Matching on memory too keeps MIG slices and other variants (H100 NVL, 94 GB) out of a kind they are not.
GPU_KIND_RULES = (
    ("t4", r"\bT4\b", 13, 17),
    ("a10g", r"\bA10G\b", 20, 25),
    ("l4", r"\bL4\b", 20, 25),
    ("l40s", r"\bL40S\b", 40, 50),
    ("a100-40gb", r"\bA100\b", 35, 42),
    ("a100-80gb", r"\bA100\b", 70, 82),
    ("h100-80gb", r"\bH100\b", 70, 82),
    ("h200", r"\bH200\b", 130, 145),
)


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower()


def _free(torch) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:300]}"


def gpu_kind(name: str, memory_gib: float) -> str:
    """The planner's name for this GPU model, or the device's own name when it is none of them."""
    for kind, pattern, low, high in GPU_KIND_RULES:
        if re.search(pattern, name, re.IGNORECASE) and low <= memory_gib <= high:
            return kind
    return name


def gpu_info(device) -> dict:
    """The device every figure was measured on; attached to each record so no figure travels without it."""
    import torch

    if device.type != "cuda":
        return {"name": "cpu (no GPU)", "memory_gib": None, "kind": "cpu"}
    name = torch.cuda.get_device_name(device)
    memory_gib = round(torch.cuda.get_device_properties(device).total_memory / GIB, 1)
    return {"name": name, "memory_gib": memory_gib, "kind": gpu_kind(name, memory_gib)}


def dtype_name(dtype) -> str:
    text = str(dtype).removeprefix("torch.")
    return DTYPE_NAMES.get(text, text)


def actor_modules(actor) -> dict:
    """The torch modules a stage actor holds, by attribute (or component) name: what its weights are."""
    import torch

    found = {}
    for attribute, value in vars(actor).items():
        for key, item in (value.items() if isinstance(value, dict) else [(attribute, value)]):
            if isinstance(item, torch.nn.Module):
                found[key] = item
    return found


def module_dtypes(modules: dict) -> dict:
    out = {}
    for key, module in modules.items():
        names = sorted({dtype_name(p.dtype) for p in module.parameters() if p.is_floating_point()})
        out[key] = names[0] if len(names) == 1 else names
    return out


def weight_bytes(modules) -> int:
    tensors = {}
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            tensors[id(tensor)] = tensor.numel() * tensor.element_size()  # shared tensors counted once
    return sum(tensors.values())


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope); through the origin when there is a single x."""
    if len(set(xs)) < 2:
        return 0.0, sum(y / x for x, y in zip(xs, ys)) / len(xs)
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
             / sum((x - mean_x) ** 2 for x in xs))
    return mean_y - slope * mean_x, slope


def fit_batch_seconds(batches: list[int], seconds: list[float]) -> tuple[float, float]:
    """(batch_overhead_s, seconds_per_image) of t(b) = a + b * c; both kept >= 0, as the planner needs."""
    overhead, per_image = fit_line(batches, seconds)
    if overhead < 0:
        overhead, per_image = 0.0, sum(b * t for b, t in zip(batches, seconds)) / sum(b * b for b in batches)
    if per_image < 0:
        overhead, per_image = statistics.fmean(seconds), 0.0
    return overhead, per_image


def to_uint8(images01):
    """[0, 1] floats -> uint8, rounding as diffusers' numpy_to_pil does."""
    import numpy as np

    return (np.asarray(images01, dtype=np.float32) * 255).round().astype(np.uint8)


def pixel_agreement(ours, theirs) -> dict:
    import numpy as np

    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    return {"psnr_db": round(10 * math.log10(255**2 / mse), 2) if mse > 0 else None, "identical": mse == 0,
            "within_2_levels": round(float(np.mean(diff <= 2)), 5), "max_abs_diff": int(diff.max())}


@dataclass
class Call:
    """One timed call of a stage (or pipeline) and what it left behind."""

    seconds: float
    ok_rows: int
    peak_bytes: int | None
    """max_memory_allocated during the call (the whole process)."""
    added_bytes: int | None
    """max_memory_allocated during the call - memory_allocated just before it."""
    row_error: str | None = None


class Bench:
    """Builds the models on the device, wraps them in the product's stage actors, and times both runners."""

    def __init__(self, args):
        import torch

        self.torch = torch
        self.args = args
        self.device = torch.device(args.device)
        self.gpu = gpu_info(self.device)
        self.shapes = SMALL if args.small else FULL
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        self.started = time.perf_counter()
        self.results: dict = {"caveats": list(CAVEATS)}
        self.generator_device = None
        """The device of the generators the product's actors draw from; detected in pilot()."""
        self._tmp = tempfile.TemporaryDirectory(prefix="gpu-bench-")  # the tokenizer's files; removed at exit
        self.tmp = self._tmp.name

    # ------------------------------------------------------------ timing and memory helpers

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def measure(self, fn, ok_rows=None) -> Call:
        """Time fn() and the CUDA memory it allocates; ok_rows(result) counts the rows that produced images."""
        cuda = self.device.type == "cuda"
        self.sync()
        if cuda:
            before = self.torch.cuda.memory_allocated(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
        began = time.perf_counter()
        result = fn()
        self.sync()
        seconds = time.perf_counter() - began
        peak = self.torch.cuda.max_memory_allocated(self.device) if cuda else None
        call = Call(seconds, 0, peak, peak - before if cuda else None)
        if ok_rows is not None:
            call.ok_rows, call.row_error = ok_rows(result)
        return call

    def over_budget(self, share: float = 1.0) -> bool:
        return time.perf_counter() - self.started > self.args.budget_s * share

    def save(self) -> None:
        # Written after every sweep so a run cut off by the device's time limit still leaves its figures.
        if self.args.json:
            with open(self.args.json, "w", encoding="utf-8") as fh:
                json.dump(self.results, fh, indent=2, default=str)

    # ------------------------------------------------------------ models

    def build(self, factory, seed: int):
        torch = self.torch
        torch.manual_seed(seed)
        # Initialising on the device itself: Karlo-size random init on a CPU takes minutes.
        with torch.device(self.device):
            module = factory()
        return module.to(dtype=self.dtype).eval().requires_grad_(False)

    def build_models(self) -> None:
        import diffusers
        from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, PriorTransformer, UnCLIPScheduler,
                               UNet2DConditionModel, UNet2DModel)
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from pipeline.presets import write_tiny_tokenizer

        began = time.perf_counter()
        diffusers.logging.set_verbosity_error()  # casting random modules warns once per class; nothing to act on
        s = self.shapes
        write_tiny_tokenizer(os.path.join(self.tmp, "tokenizer"))
        self.tokenizer = CLIPTokenizer.from_pretrained(os.path.join(self.tmp, "tokenizer"))
        tok = self.tokenizer
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

        def prior():
            model = PriorTransformer(**s["prior"])
            # A freshly built prior has clip_std = 0, which maps every sampled embedding to clip_mean and would
            # feed the decoder one constant embedding; real checkpoints carry CLIP's statistics there.
            model.clip_std.data.fill_(1.0)
            return model

        unclip = {
            "tokenizer": tok,
            "text_encoder": self.build(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**s["text"], **ids)), 0),
            "prior": self.build(prior, 1),
            "text_proj": self.build(lambda: UnCLIPTextProjModel(**s["text_proj"]), 2),
            "decoder": self.build(lambda: UNet2DConditionModel(**s["decoder"]), 3),
            "super_res_first": self.build(lambda: UNet2DModel(**s["super_res"]), 4),
            "super_res_last": self.build(lambda: UNet2DModel(**s["super_res"]), 5),
        }
        unclip.update(self.karlo_schedulers(UnCLIPScheduler))
        self.unclip = unclip
        self.x4 = None
        if not self.args.no_1024:
            self.x4 = {
                "tokenizer": tok,
                "text_encoder": self.build(lambda: CLIPTextModel(CLIPTextConfig(**s["x4_text"], **ids)), 10),
                "unet": self.build(lambda: UNet2DConditionModel(**s["x4_unet"]), 11),
                # Loaded in the run's dtype, as the product's loader does; the actor decides about upcasting.
                "vae": self.build(lambda: AutoencoderKL(**s["x4_vae"]), 12),
                # As the x4 snapshot ships them.
                "scheduler": DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                                           clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                           prediction_type="v_prediction"),
                "low_res_scheduler": DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                                                   clip_sample=False, variance_type="fixed_small"),
            }
        self.sync()

        def params(module) -> float:
            return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)

        modules = {k: v for k, v in {**unclip, **{f"x4_{k}": v for k, v in (self.x4 or {}).items()}}.items()
                   if hasattr(v, "parameters")}
        self.results["models"] = {
            "params_millions": {name: params(m) for name, m in modules.items()},
            "attention": {name: sorted({type(p).__name__ for p in m.attn_processors.values()})
                          for name, m in modules.items() if hasattr(m, "attn_processors")},
            "text_attention": unclip["text_encoder"].config._attn_implementation,
            "build_s": round(time.perf_counter() - began, 1),
            "shapes": "small (CPU smoke test)" if self.args.small else "Karlo + x4 upscaler",
        }

    @staticmethod
    def karlo_schedulers(UnCLIPScheduler) -> dict:
        # Scheduler settings as in the Karlo snapshot (same as pipeline/presets.py).
        return {
            "prior_scheduler": UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                               clip_sample=True, clip_sample_range=5.0),
            "decoder_scheduler": UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon",
                                                 clip_sample=True, clip_sample_range=1.0),
            "super_res_scheduler": UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon",
                                                   clip_sample=True, clip_sample_range=1.0),
        }

    # ------------------------------------------------------------ our pipeline: the real stage actors

    def make_actors(self) -> None:
        from actors.base import StageContext
        from pipeline.config import load_config
        from pipeline.plan import stage_specs

        sets = ["models.unclip=injected://unclip", "models.clip=null", f"dtype={self.args.dtype}",
                "models.upsampler_1024=" + ("null" if self.args.no_1024 else "injected://upsampler_1024")]
        if self.args.quick:
            sets += [f"stages.{name}.steps=2" for name in ("prior", "decoder", "upsampler_256", "upsampler_1024")]
        self.config = load_config(None, sets, input_path="unused", output_path="unused")
        layouts = {"unclip": self.unclip, "upsampler_1024": self.x4}

        def injected(base):
            # The actor's own load() runs unchanged; only where its components come from is replaced.
            class Injected(base):
                def checkpoint(self, source_key):
                    return f"<injected {source_key}>"  # a path no model_index.json lives under

                def load_component(self, path, layout, component):
                    return layouts[layout][component]

            Injected.__name__ = Injected.__qualname__ = f"Bench{base.__name__}"
            return Injected

        self.specs = stage_specs(self.config)
        self.actors = {}
        for spec in self.specs:
            context = StageContext(config=self.config, use_gpu=self.device.type == "cuda",
                                   final_image=spec.final_image, options=spec.options)
            self.actors[spec.name] = injected(spec.actor_class())(context)
        self.results["settings"] = {
            spec.name: {k: getattr(self.actors[spec.name].settings, k) for k in ("steps", "guidance_scale")
                        if hasattr(self.actors[spec.name].settings, k)} for spec in self.specs}
        self.results["settings"]["dtype"] = self.args.dtype
        self.results["settings"]["dtype_requested"] = self.args.dtype_requested
        self.results["settings"]["prior_best_of"] = self.config.prior.best_of
        self.stage_modules = {name: actor_modules(actor) for name, actor in self.actors.items()}
        self.stage_weight_bytes = {name: weight_bytes(m.values()) for name, m in self.stage_modules.items()}
        # After load(): what the actors made of the modules they were given (e.g. an upcast VAE).
        dtypes = {name: module_dtypes(m) for name, m in self.stage_modules.items()}
        self.results["module_dtypes"] = dtypes
        self.results["caveats"].append("Dtypes as run: " + "; ".join(
            f"{stage}: " + ", ".join(f"{module} {dtype}" for module, dtype in modules.items())
            for stage, modules in dtypes.items()) + ".")

    @contextlib.contextmanager
    def steps(self, actor, steps: int | None):
        settings = actor.settings
        if steps is None or not hasattr(settings, "steps"):
            yield
            return
        saved = settings.steps
        settings.steps = steps
        try:
            yield
        finally:
            settings.steps = saved

    def pilot(self) -> None:
        """One short pass through every stage: checks the wiring and gives each stage a real input batch."""
        import numpy as np

        from benchmarks.local import prompt_batch

        batch = prompt_batch([PROMPT.format(i) for i in range(PILOT_ROWS)], np.arange(PILOT_ROWS).reshape(-1, 1))
        self.inputs = {}
        state_bytes = None
        for spec in self.specs:
            self.inputs[spec.name] = batch
            with self.steps(self.actors[spec.name], WARM_STEPS):
                batch = self.actors[spec.name](batch)
            if state_bytes is None and "generator_state" in batch:
                state_bytes = int(np.asarray(batch["generator_state"]).shape[-1])
        status = np.asarray(batch["status"]).astype(object)
        errors = sorted({str(e) for s, e in zip(status, batch["error"]) if s != "ok"})
        self.results["pilot"] = {"rows": PILOT_ROWS, "non_ok_rows": int((status != "ok").sum()),
                                 "row_errors": errors,
                                 "final_columns": sorted(k for k in batch if not k.startswith("_"))}
        if errors:
            print(f"pilot: {len(errors)} kind(s) of error row, later stages will see them: {errors}", flush=True)
        self.detect_generators(state_bytes)

    def detect_generators(self, state_bytes: int | None) -> None:
        """Which device the product's generators live on, read off the state the actors hand on (a CPU
        generator's state is its mt19937 table, a CUDA one's a philox seed and offset), not assumed."""
        cpu_bytes = int(self.torch.Generator("cpu").get_state().numel())
        if self.device.type == "cpu":
            self.generator_device, how = self.torch.device("cpu"), "the run is on the CPU, so all generators are CPU"
        elif state_bytes == cpu_bytes:
            self.generator_device, how = self.torch.device("cpu"), f"generator_state is {state_bytes} bytes (CPU)"
        else:
            self.generator_device = self.device
            how = f"generator_state is {state_bytes} bytes, not a CPU generator's {cpu_bytes}"
        self.results["generators"] = {"device": self.generator_device.type, "detected": how,
                                      "state_bytes": state_bytes}
        print(f"the product's actors draw random numbers from {self.generator_device.type} generators ({how}); "
              "diffusers gets the same kind", flush=True)

    def generators(self, seeds) -> list:
        return [self.torch.Generator(self.generator_device).manual_seed(int(s)) for s in seeds]

    @staticmethod
    def tile(batch: dict, rows: int) -> dict:
        import numpy as np

        index = np.arange(rows) % len(batch["status"])
        out = {k: np.asarray(v)[index] for k, v in batch.items()}
        out["id"] = np.array([f"row{i}" for i in range(rows)], dtype=object)
        out["seeds"] = np.arange(rows, dtype=np.int64).reshape(rows, -1)
        return out

    def batches(self, name: str) -> tuple[int, ...]:
        return QUICK_BATCHES if self.args.quick or self.args.small else DEFAULT_BATCHES[name]

    @staticmethod
    def ok_rows(out: dict) -> tuple[int, str | None]:
        import numpy as np

        status = np.asarray(out["status"]).astype(object)
        bad = np.nonzero(status != "ok")[0]
        return len(status) - len(bad), (str(out["error"][bad[0]]) if len(bad) else None)

    def sweep_stage(self, name: str) -> dict:
        actor = self.actors[name]
        weights = self.stage_weight_bytes[name]
        full_steps = getattr(actor.settings, "steps", None)
        extrapolate = name == "upsampler_1024" and not self.args.x4_full_steps
        measured_steps = ((2, 4) if self.args.quick or self.args.small else (3, 9)) if extrapolate else None
        record = {"gpu": self.gpu, "dtype": self.args.dtype, "module_dtypes": self.results["module_dtypes"][name],
                  "weights_gib": round(weights / GIB, 4), "steps": full_steps, "batches": {}}
        if extrapolate:
            record["extrapolated_from_steps"] = list(measured_steps)
        for rows in self.batches(name):
            if self.over_budget(OURS_BUDGET_SHARE):
                record["batches"][rows] = {"skipped": "time budget"}
                break
            batch = self.tile(self.inputs[name], rows)
            # One forward pass per call, as a pool actor planned at this size (the actor reads its pass size
            # once when it starts, and lowers it for good after running out of memory).
            actor.batch_images = rows
            halvings_before = actor.oom_halvings
            try:
                with self.steps(actor, WARM_STEPS if full_steps else None):
                    # Warm-up: kernels, allocator and cuDNN plans for these shapes.
                    calls = [self.measure(lambda: actor(batch), self.ok_rows)]
                if extrapolate:
                    low, high = measured_steps
                    timed = {}
                    for steps in measured_steps:
                        with self.steps(actor, steps):
                            timed[steps] = [self.measure(lambda: actor(batch), self.ok_rows)
                                            for _ in range(self.args.repeats)]
                    t_low = statistics.median(c.seconds for c in timed[low])
                    t_high = statistics.median(c.seconds for c in timed[high])
                    per_step = max(0.0, (t_high - t_low) / (high - low))
                    fixed = max(0.0, t_low - low * per_step)
                    seconds = fixed + full_steps * per_step
                    timed_calls = timed[low] + timed[high]
                    entry = {"measured_s": {str(k): [round(c.seconds, 4) for c in v] for k, v in timed.items()},
                             "per_step_s": round(per_step, 5), "fixed_s": round(fixed, 4),
                             "seconds": round(seconds, 4)}
                else:
                    timed_calls = [self.measure(lambda: actor(batch), self.ok_rows) for _ in range(self.args.repeats)]
                    seconds = statistics.median(c.seconds for c in timed_calls)
                    entry = {"measured_s": [round(c.seconds, 4) for c in timed_calls], "seconds": round(seconds, 4)}
                calls += timed_calls
                ok = min(c.ok_rows for c in timed_calls)
                entry["ok_rows"] = ok
                entry["images_per_s"] = round(ok / seconds, 4) if seconds > 0 else None
                entry.update(self.memory_entry(calls, weights))
                row_error = next((c.row_error for c in calls if c.row_error), None)
                if row_error:
                    entry["row_error"] = row_error[:300]
                halvings = actor.oom_halvings - halvings_before
                if halvings:
                    entry["oom_halvings"] = halvings
                record["batches"][rows] = entry
                note = f" ({ok}/{rows} rows ok: {row_error[:120]})" if ok < rows else ""
                if halvings:
                    note += f" (out of memory: the actor split its passes {halvings} time(s))"
                print(f"  {name:<15} batch {rows:>4}: {entry['images_per_s']} images/s, peak alone "
                      f"{entry['peak_gib_alone']} GiB{note}", flush=True)
                if halvings:
                    break  # larger batches would not fit either
            except Exception as exc:  # noqa: BLE001 - one failing size must not cost the rest of the run
                record["batches"][rows] = {"error": _first_line(exc)}
                print(f"  {name:<15} batch {rows:>4}: {record['batches'][rows]['error']}", flush=True)
                if not _is_oom(exc):
                    traceback.print_exc()
                _free(self.torch)
                break  # larger batches would fail the same way
        _best(record)
        record["fit"] = fit_stage(record)
        return record

    def memory_entry(self, calls: list[Call], weights: int) -> dict:
        if self.device.type != "cuda":
            return {"peak_gib": None, "peak_gib_alone": None}
        return {"peak_gib": round(max(c.peak_bytes for c in calls) / GIB, 3),
                "peak_gib_alone": round((weights + max(c.added_bytes for c in calls)) / GIB, 3)}

    def run_ours(self) -> None:
        self.results["stages"] = {}
        for spec in self.specs:
            print(f"stage {spec.name}", flush=True)
            try:
                self.results["stages"][spec.name] = self.sweep_stage(spec.name)
            except Exception as exc:  # noqa: BLE001 - keep the other stages' figures
                self.results["stages"][spec.name] = {"gpu": self.gpu, "error": f"{type(exc).__name__}: {exc}"[:500]}
            self.save()
        self.results["end_to_end"] = end_to_end(self.results["stages"])
        self.save()

    # ------------------------------------------------------------ diffusers: pixels and speed

    def unclip_pipeline(self):
        from diffusers import UnCLIPPipeline, UnCLIPScheduler

        parts = {k: v for k, v in self.unclip.items() if not k.endswith("scheduler")}
        pipe = UnCLIPPipeline(**parts, **self.karlo_schedulers(UnCLIPScheduler))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def unclip_call_kwargs(self) -> dict:
        settings = self.results["settings"]
        return dict(prior_num_inference_steps=settings["prior"]["steps"],
                    decoder_num_inference_steps=settings["decoder"]["steps"],
                    super_res_num_inference_steps=settings["upsampler_256"]["steps"],
                    prior_guidance_scale=settings["prior"]["guidance_scale"],
                    decoder_guidance_scale=settings["decoder"]["guidance_scale"])

    def compare_pixels(self) -> None:
        """Same modules, prompts and seeds through our actors and through UnCLIPPipeline: how close the pixels are."""
        import numpy as np

        from benchmarks.local import prompt_batch

        count = self.args.pixel_prompts
        prompts = [PIXEL_PROMPT.format(i) for i in range(count)]
        seeds = [PIXEL_FIRST_SEED + i for i in range(count)]
        kwargs = self.unclip_call_kwargs()
        record = {"gpu": self.gpu, "dtype": self.args.dtype, "generators": self.generator_device.type,
                  "prompts": count, "seeds": seeds, "steps_and_guidance": kwargs,
                  "tolerance": f"PSNR >= {PIXEL_MIN_PSNR_DB:g} dB and >= {PIXEL_MIN_WITHIN_2_LEVELS:.0%} of uint8 "
                               "values within 2 levels, per image"}
        self.results["pixels"] = record
        print(f"pixels: {count} prompts through our actors and through diffusers, {self.generator_device.type} "
              "generators", flush=True)
        try:
            batch = prompt_batch(prompts, np.array(seeds).reshape(-1, 1))
            for name in PIXEL_CHAIN:
                self.actors[name].batch_images = count
                batch = self.actors[name](batch)
            ok, row_error = self.ok_rows(batch)
            if ok < count:
                record.update(passes=False, error=f"{count - ok} of our rows are errors: {row_error}"[:300])
                return
            if "image" in batch:
                ours = np.asarray(batch["image"])[:, 0]
            else:
                ours = to_uint8(np.asarray(batch["image_256"])[:, 0].transpose(0, 2, 3, 1))
            pipe = self.unclip_pipeline()
            with self.torch.inference_mode():
                theirs = to_uint8(pipe(prompts, generator=self.generators(seeds), output_type="np", **kwargs).images)
        except Exception as exc:  # noqa: BLE001 - the speed figures stand without it
            record.update(passes=False, error=_first_line(exc))
            if not _is_oom(exc):
                traceback.print_exc()
            return
        images = [{"seed": s, **pixel_agreement(a, b)} for s, a, b in zip(seeds, ours, theirs)]
        record["images"] = images
        psnrs = [i["psnr_db"] for i in images if not i["identical"]]
        record["min_psnr_db"] = min(psnrs) if psnrs else None
        record["min_within_2_levels"] = min(i["within_2_levels"] for i in images)
        record["passes"] = all(i["identical"] or (i["psnr_db"] >= PIXEL_MIN_PSNR_DB
                                                  and i["within_2_levels"] >= PIXEL_MIN_WITHIN_2_LEVELS)
                               for i in images)
        self.save()

    def run_baseline(self) -> None:
        import numpy as np

        torch = self.torch
        # Our actors and the x4 models are done with: free their memory, then reuse the same modules.
        self.actors = None
        self.x4 = None
        _free(torch)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.args.baseline_dtype]
        for value in self.unclip.values():
            if hasattr(value, "parameters"):
                value.to(dtype)
        pipe = self.unclip_pipeline()
        weights = weight_bytes(v for v in self.unclip.values() if hasattr(v, "parameters"))
        steps = self.unclip_call_kwargs()
        warm = dict(steps, prior_num_inference_steps=WARM_STEPS, decoder_num_inference_steps=WARM_STEPS,
                    super_res_num_inference_steps=WARM_STEPS)
        record = {"gpu": self.gpu, "runner": "diffusers UnCLIPPipeline", "dtype": self.args.baseline_dtype,
                  "output": "256px np", "generators": f"one {self.generator_device.type} generator per prompt",
                  "weights_gib": round(weights / GIB, 4),
                  "steps": {k: v for k, v in steps.items() if k.endswith("steps")}, "batches": {}}
        print("baseline diffusers UnCLIPPipeline", flush=True)
        sizes = QUICK_BATCHES if self.args.quick or self.args.small else BASELINE_BATCHES
        for rows in sizes:
            if self.over_budget():
                record["batches"][rows] = {"skipped": "time budget"}
                break
            prompts = [PROMPT.format(i) for i in range(rows)]

            def call(kwargs):
                # The same kind of generators as our actors draw from, so both pay the same for random numbers.
                return pipe(prompts, generator=self.generators(range(rows)), output_type="np", **kwargs).images

            def finite_rows(images):
                finite = int(np.isfinite(images.reshape(len(images), -1)).all(axis=1).sum())
                return finite, None if finite == len(images) else "non-finite pixels"

            try:
                calls = [self.measure(lambda: call(warm), finite_rows)]
                timed = [self.measure(lambda: call(steps), finite_rows) for _ in range(self.args.repeats)]
            except Exception as exc:  # noqa: BLE001
                record["batches"][rows] = {"error": _first_line(exc)}
                print(f"  baseline batch {rows:>4}: {record['batches'][rows]['error']}", flush=True)
                if not _is_oom(exc):
                    traceback.print_exc()
                _free(torch)
                break
            seconds = statistics.median(c.seconds for c in timed)
            ok = min(c.ok_rows for c in timed)
            entry = {"measured_s": [round(c.seconds, 4) for c in timed], "seconds": round(seconds, 4),
                     "ok_rows": ok, "images_per_s": round(ok / seconds, 4),
                     **self.memory_entry(calls + timed, weights)}
            record["batches"][rows] = entry
            print(f"  baseline batch {rows:>4}: {entry['images_per_s']} images/s", flush=True)
        _best(record)
        self.results["baseline"] = record
        self.save()


def _usable(entry: dict, rows) -> bool:
    """A batch that ran as asked: every row produced its image, in passes of the size asked for."""
    return "seconds" in entry and entry.get("ok_rows") == int(rows) and not entry.get("oom_halvings")


def _best(record: dict) -> None:
    rated = {b: e["images_per_s"] for b, e in record["batches"].items() if e.get("images_per_s") and _usable(e, b)}
    if rated:
        best = max(rated, key=rated.get)
        record["best_batch"], record["best_images_per_s"] = best, rated[best]


def fit_stage(record: dict) -> dict | None:
    """The planner's cost model for one stage from its sweep: t(b) = a + b*c, memory = weights + b*m."""
    whole = {int(b): e for b, e in record["batches"].items() if _usable(e, b)}
    if not whole:
        return None
    sizes = sorted(whole)
    overhead, per_image = fit_batch_seconds(sizes, [whole[b]["seconds"] for b in sizes])
    fit = {"fit_batches": sizes, "seconds_per_image": round(per_image, 6), "batch_overhead_s": round(overhead, 6),
           "weights_gb": record["weights_gib"], "activation_gb_per_image": None, "fixed_gb": None}
    peaks = [whole[b].get("peak_gib_alone") for b in sizes]
    if all(p is not None for p in peaks):
        if len(sizes) > 1:
            intercept, slope = fit_line(sizes, peaks)
        else:  # one point: all of it above the weights counts as per image
            intercept, slope = record["weights_gib"], (peaks[0] - record["weights_gib"]) / sizes[0]
        fit["activation_gb_per_image"] = round(max(0.0, slope), 6)
        fit["fixed_gb"] = round(intercept - record["weights_gib"], 4)
    return fit


def cost_profile(results: dict) -> dict:
    """The planner's JSON cost profile: every stage that has a fit."""
    stages = {}
    for name, record in results.get("stages", {}).items():
        fit = record.get("fit")
        if fit:
            stages[name] = {"seconds_per_image": fit["seconds_per_image"], "batch_overhead_s": fit["batch_overhead_s"],
                            "weights_gb": fit["weights_gb"], "activation_gb_per_image": fit["activation_gb_per_image"]}
    return {"gpu": results["environment"]["gpu"]["kind"], "stages": stages}


def end_to_end(stages: dict) -> dict:
    """Bounds from per-stage rates: each stage at its best batch, and every stage at one common batch size."""
    chain_256 = [s for s in PIXEL_CHAIN if s in stages]
    out = {}
    for label, chain in (("256px", chain_256), ("1024px", chain_256 + ["upsampler_1024"])):
        if any(s not in stages for s in chain):
            continue
        rates = [stages[s].get("best_images_per_s") for s in chain]
        if all(rates):
            out[f"bound_{label}_images_per_s"] = round(1 / sum(1 / r for r in rates), 4)
    common = set.intersection(*(set(stages[s].get("batches", {})) for s in chain_256)) if chain_256 else set()
    same = {}
    for rows in sorted(common):
        entries = [stages[s]["batches"][rows] for s in chain_256]
        if all(_usable(e, rows) for e in entries):
            same[rows] = round(rows / sum(e["seconds"] for e in entries), 4)
    out["256px_all_stages_at_one_batch_images_per_s"] = same
    return out


def environment(bench: Bench) -> dict:
    import torch

    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "device": str(bench.device), "gpu": bench.gpu,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}
    for package in ("diffusers", "transformers"):
        with contextlib.suppress(Exception):
            info[package] = __import__(package).__version__
    return info


def _cell(rows, entry: dict, value: str) -> str:
    if value in entry and entry[value] is not None:
        text = str(entry[value])
        if "ok_rows" in entry and entry["ok_rows"] < int(rows):
            text += f"({entry['ok_rows']}ok)"
        if entry.get("oom_halvings"):
            text += "(oom-split)"
        return f"{rows}:{text}"
    return f"{rows}:{entry.get('error', entry.get('skipped', '-'))[:12]}"


def print_report(results: dict) -> None:
    env = results["environment"]
    gpu = env["gpu"]
    gpu_text = f"{gpu['name']}, {gpu['memory_gib']} GiB, kind {gpu['kind']}" if gpu["memory_gib"] else gpu["name"]
    print(f"\nGPU benchmark on {gpu_text}; {env['date']}; torch {env['torch']}, "
          f"diffusers {env.get('diffusers')}, transformers {env.get('transformers')}")
    models = results.get("models", {})
    print(f"models ({models.get('shapes')}), millions of parameters: {models.get('params_millions')}")
    print(f"attention processors: {models.get('attention')}; text encoder: {models.get('text_attention')}")
    print(f"dtype {results['settings']['dtype']} (asked: {results['settings']['dtype_requested']}); "
          f"module dtypes: {results.get('module_dtypes')}")
    rows = [("stage", "gpu", "steps", "images/s by batch size", "best batch", "best images/s", "s/image",
             "weights GiB", "peak GiB alone by batch")]
    for name, record in results.get("stages", {}).items():
        if "error" in record:
            rows.append((name, record["gpu"]["kind"], "", record["error"][:80], "", "", "", "", ""))
            continue
        rates = " ".join(_cell(b, e, "images_per_s") for b, e in record["batches"].items())
        peaks = " ".join(f"{b}:{e['peak_gib_alone']}" for b, e in record["batches"].items() if "peak_gib_alone" in e)
        steps = record.get("steps")
        if "extrapolated_from_steps" in record:
            steps = f"{steps}*"
        best = record.get("best_images_per_s")
        rows.append((name, record["gpu"]["kind"], steps if steps is not None else "-", rates,
                     record.get("best_batch", "-"), best or "-", round(1 / best, 4) if best else "-",
                     record["weights_gib"], peaks or "-"))
    baseline = results.get("baseline")
    if baseline:
        rates = " ".join(_cell(b, e, "images_per_s") for b, e in baseline["batches"].items())
        peaks = " ".join(f"{b}:{e['peak_gib_alone']}" for b, e in baseline["batches"].items()
                         if "peak_gib_alone" in e)
        best = baseline.get("best_images_per_s")
        rows.append((f"diffusers UnCLIPPipeline {baseline['dtype']} (256px)", baseline["gpu"]["kind"],
                     "/".join(str(v) for v in baseline["steps"].values()), rates, baseline.get("best_batch", "-"),
                     best or "-", round(1 / best, 4) if best else "-", baseline["weights_gib"], peaks or "-"))
    _print_table(rows)
    if any("extrapolated_from_steps" in r for r in results.get("stages", {}).values()):
        print("* upsampler_1024: timed at "
              f"{results['stages']['upsampler_1024']['extrapolated_from_steps']} steps, extrapolated to its steps")
    fits = [(name, r["fit"]) for name, r in results.get("stages", {}).items() if r.get("fit")]
    if fits:
        print(f"\ncost fit on {gpu['kind']} (t = a + b*c; memory = weights + b*m, GiB):")
        table = [("stage", "c s/image", "a s/batch", "weights", "m per image", "fixed", "batches")]
        table += [(name, f["seconds_per_image"], f["batch_overhead_s"], f["weights_gb"],
                   f["activation_gb_per_image"], f["fixed_gb"], ",".join(map(str, f["fit_batches"])))
                  for name, f in fits]
        _print_table(table)
    e2e = results.get("end_to_end", {})
    print()
    for key in ("bound_256px_images_per_s", "bound_1024px_images_per_s"):
        if key in e2e:
            print(f"ours, end to end {key.split('_')[1]} (bound 1/sum(1/rate), best batch per stage): "
                  f"{e2e[key]} images/s")
    if e2e.get("256px_all_stages_at_one_batch_images_per_s"):
        print(f"ours, 256px with every stage at one batch size: {e2e['256px_all_stages_at_one_batch_images_per_s']}")
    for key, value in results.get("comparison", {}).items():
        print(f"{key}: {value}")
    pixels = results.get("pixels")
    if pixels:
        print(f"\npixels vs diffusers ({pixels['gpu']['kind']}, {pixels['dtype']}, {pixels['generators']} "
              f"generators, {pixels['tolerance']}): ", end="")
        if "error" in pixels:
            print(f"not compared: {pixels['error']}")
        else:
            per_image = ", ".join(
                f"seed {i['seed']}: {'identical' if i['identical'] else str(i['psnr_db']) + ' dB'} "
                f"{i['within_2_levels']:.2%} within 2" for i in pixels["images"])
            print(f"{'PASS' if pixels['passes'] else 'FAIL'}; {per_image}")
    print("\ncaveats:")
    for line in results["caveats"]:
        print(f"- {line}")


def _print_table(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    print()
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def compare(results: dict) -> dict:
    baseline, e2e = results.get("baseline", {}), results.get("end_to_end", {})
    theirs = baseline.get("best_images_per_s")
    out = {}
    if theirs and e2e.get("bound_256px_images_per_s"):
        out["ratio_ours_bound_256px_over_diffusers_best"] = round(e2e["bound_256px_images_per_s"] / theirs, 3)
    same = e2e.get("256px_all_stages_at_one_batch_images_per_s", {})
    if theirs and baseline.get("best_batch") in same:
        out["ratio_ours_same_batch_over_diffusers_best"] = round(same[baseline["best_batch"]] / theirs, 3)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 steps per stage, batch sizes 1 and 2: a smoke run")
    parser.add_argument("--small", action="store_true",
                        help="toy widths (a CPU check of the script; its figures mean nothing)")
    parser.add_argument("--json", help="also write the figures to this JSON file (rewritten after every sweep)")
    parser.add_argument("--profile-json", help="write the planner's cost profile (fitted per stage) to this file")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --small when no GPU)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                        help="our stages' dtype; auto (default) is the product's: fp16 on a GPU, fp32 on a CPU")
    parser.add_argument("--baseline-dtype", default=None, choices=["fp16", "bf16", "fp32"],
                        help="the diffusers baseline's dtype (default: the same as ours)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per batch size (median reported)")
    parser.add_argument("--pixel-prompts", type=int, default=4,
                        help="prompts compared pixel by pixel with diffusers (0: no comparison)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="stop trying larger batch sizes after this many seconds in all (our stages get "
                             f"{OURS_BUDGET_SHARE * 100:.0f}%% of it, the baseline the rest)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--no-1024", action="store_true", help="leave out the x4 upscaler stage")
    parser.add_argument("--x4-full-steps", action="store_true",
                        help="time upsampler_1024 at its full step count instead of extrapolating")
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.device.startswith("cuda") and not args.small:
        parser.error("Karlo-size models need a GPU: pass --small for a CPU check of the script")
    args.dtype_requested = args.dtype
    if args.dtype == "auto":  # as the product's compute_dtype reads 'auto'
        args.dtype = "fp16" if args.device.startswith("cuda") else "fp32"
    args.baseline_dtype = args.baseline_dtype or args.dtype
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    bench.results["environment"] = environment(bench)
    bench.results["command"] = "python -m benchmarks.gpu_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    bench.build_models()
    bench.make_actors()
    bench.pilot()
    bench.save()
    bench.run_ours()
    if args.pixel_prompts > 0:
        bench.compare_pixels()  # before the baseline, which may recast the modules and frees the actors
    if not args.no_baseline:
        bench.run_baseline()
    bench.results["comparison"] = compare(bench.results)
    bench.results["wall_s"] = round(time.perf_counter() - bench.started, 1)
    bench.save()
    if args.profile_json:
        with open(args.profile_json, "w", encoding="utf-8") as fh:
            json.dump(cost_profile(bench.results), fh, indent=2)
            fh.write("\n")
    print_report(bench.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
