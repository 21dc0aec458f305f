"""GPU benchmark: Karlo-size random-weight models in our stage actors (bf16) vs diffusers' UnCLIPPipeline (fp16)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

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
    "Our stages run in bf16 as the issue asks (the product's dtype 'auto' picks fp16 on GPUs; same speed on "
    "Hopper); the baseline runs the same modules cast to fp16, with the same steps and guidance.",
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


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower()


def _free(torch) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Bench:
    """Builds the models on the device, wraps them in the product's stage actors, and times both runners."""

    def __init__(self, args):
        import torch

        self.torch = torch
        self.args = args
        self.device = torch.device(args.device)
        self.shapes = SMALL if args.small else FULL
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        self.started = time.perf_counter()
        self.results: dict = {"caveats": CAVEATS}
        self._tmp = tempfile.TemporaryDirectory(prefix="gpu-bench-")  # the tokenizer's files; removed at exit
        self.tmp = self._tmp.name

    # ------------------------------------------------------------ timing helpers

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def timed(self, fn) -> float:
        self.sync()
        began = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - began

    def over_budget(self, share: float = 1.0) -> bool:
        return time.perf_counter() - self.started > self.args.budget_s * share

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return round(self.torch.cuda.max_memory_allocated() / 2**30, 2)

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
            model.clip_std.data.fill_(1.0)  # a random prior has clip_std = 0 (SPEC 2)
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

        from pipeline.local import prompt_batch

        batch = prompt_batch([PROMPT.format(i) for i in range(PILOT_ROWS)], np.arange(PILOT_ROWS).reshape(-1, 1))
        self.inputs = {}
        for spec in self.specs:
            self.inputs[spec.name] = batch
            with self.steps(self.actors[spec.name], WARM_STEPS):
                batch = self.actors[spec.name](batch)
        bad = [s for s in batch["status"] if s != "ok"]
        self.results["pilot"] = {"rows": PILOT_ROWS, "non_ok_rows": len(bad),
                                 "final_columns": sorted(k for k in batch if not k.startswith("_"))}

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

    def sweep_stage(self, name: str) -> dict:
        actor = self.actors[name]
        full_steps = getattr(actor.settings, "steps", None)
        extrapolate = name == "upsampler_1024" and not self.args.x4_full_steps
        measured_steps = ((2, 4) if self.args.quick or self.args.small else (3, 9)) if extrapolate else None
        record = {"steps": full_steps, "batches": {}}
        if extrapolate:
            record["extrapolated_from_steps"] = list(measured_steps)
        for rows in self.batches(name):
            if self.over_budget(OURS_BUDGET_SHARE):
                record["batches"][rows] = {"skipped": "time budget"}
                break
            batch = self.tile(self.inputs[name], rows)
            actor.settings.batch_size = rows  # one forward pass per call, as a pool actor with this setting
            self.reset_peak()
            try:
                with self.steps(actor, WARM_STEPS if full_steps else None):
                    actor(batch)  # warm-up: kernels, allocator and cuDNN plans for these shapes
                if extrapolate:
                    low, high = measured_steps
                    times = {}
                    for steps in measured_steps:
                        with self.steps(actor, steps):
                            times[steps] = [self.timed(lambda: actor(batch)) for _ in range(self.args.repeats)]
                    t_low, t_high = statistics.median(times[low]), statistics.median(times[high])
                    per_step = max(0.0, (t_high - t_low) / (high - low))
                    fixed = max(0.0, t_low - low * per_step)
                    seconds = fixed + full_steps * per_step
                    entry = {"measured_s": {str(k): [round(t, 4) for t in v] for k, v in times.items()},
                             "per_step_s": round(per_step, 5), "fixed_s": round(fixed, 4),
                             "seconds": round(seconds, 4)}
                else:
                    times = [self.timed(lambda: actor(batch)) for _ in range(self.args.repeats)]
                    seconds = statistics.median(times)
                    entry = {"measured_s": [round(t, 4) for t in times], "seconds": round(seconds, 4)}
                entry["images_per_s"] = round(rows / seconds, 4) if seconds > 0 else None
                entry["peak_gib"] = self.peak_gib()
                record["batches"][rows] = entry
                print(f"  {name:<15} batch {rows:>4}: {entry['images_per_s']} images/s", flush=True)
            except Exception as exc:  # noqa: BLE001 - one failing size must not cost the rest of the run
                record["batches"][rows] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
                print(f"  {name:<15} batch {rows:>4}: {record['batches'][rows]['error']}", flush=True)
                if not _is_oom(exc):
                    traceback.print_exc()
                _free(self.torch)
                break  # larger batches would fail the same way
        _best(record)
        return record

    def run_ours(self) -> None:
        self.results["stages"] = {}
        for spec in self.specs:
            print(f"stage {spec.name}", flush=True)
            try:
                self.results["stages"][spec.name] = self.sweep_stage(spec.name)
            except Exception as exc:  # noqa: BLE001 - keep the other stages' figures
                self.results["stages"][spec.name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            self.save()
        self.results["end_to_end"] = end_to_end(self.results["stages"])
        self.save()

    # ------------------------------------------------------------ diffusers baseline

    def run_baseline(self) -> None:
        from diffusers import UnCLIPPipeline, UnCLIPScheduler

        torch = self.torch
        # Our actors and the x4 models are done with: free their memory, then reuse the same modules in fp16.
        self.actors = None
        self.x4 = None
        _free(torch)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.args.baseline_dtype]
        parts = {k: (v.to(dtype) if hasattr(v, "parameters") else v) for k, v in self.unclip.items()
                 if not k.endswith("scheduler")}
        pipe = UnCLIPPipeline(**parts, **self.karlo_schedulers(UnCLIPScheduler))
        pipe.set_progress_bar_config(disable=True)
        settings = self.results["settings"]
        steps = dict(prior_num_inference_steps=settings["prior"]["steps"],
                     decoder_num_inference_steps=settings["decoder"]["steps"],
                     super_res_num_inference_steps=settings["upsampler_256"]["steps"],
                     prior_guidance_scale=settings["prior"]["guidance_scale"],
                     decoder_guidance_scale=settings["decoder"]["guidance_scale"])
        warm = dict(steps, prior_num_inference_steps=WARM_STEPS, decoder_num_inference_steps=WARM_STEPS,
                    super_res_num_inference_steps=WARM_STEPS)
        record = {"runner": "diffusers UnCLIPPipeline", "dtype": self.args.baseline_dtype, "output": "256px np",
                  "steps": {k: v for k, v in steps.items() if k.endswith("steps")}, "batches": {}}
        print("baseline diffusers UnCLIPPipeline", flush=True)
        sizes = QUICK_BATCHES if self.args.quick or self.args.small else BASELINE_BATCHES
        for rows in sizes:
            if self.over_budget():
                record["batches"][rows] = {"skipped": "time budget"}
                break
            prompts = [PROMPT.format(i) for i in range(rows)]

            def call(kwargs):
                # One generator for the batch, as a plain diffusers user would pass it.
                generator = torch.Generator(self.device.type).manual_seed(0)
                pipe(prompts, generator=generator, output_type="np", **kwargs)

            self.reset_peak()
            try:
                call(warm)
                times = [self.timed(lambda: call(steps)) for _ in range(self.args.repeats)]
            except Exception as exc:  # noqa: BLE001
                record["batches"][rows] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
                print(f"  baseline batch {rows:>4}: {record['batches'][rows]['error']}", flush=True)
                if not _is_oom(exc):
                    traceback.print_exc()
                _free(torch)
                break
            seconds = statistics.median(times)
            record["batches"][rows] = {"measured_s": [round(t, 4) for t in times], "seconds": round(seconds, 4),
                                       "images_per_s": round(rows / seconds, 4), "peak_gib": self.peak_gib()}
            print(f"  baseline batch {rows:>4}: {record['batches'][rows]['images_per_s']} images/s", flush=True)
        _best(record)
        self.results["baseline"] = record
        self.save()


def _best(record: dict) -> None:
    rated = {b: e["images_per_s"] for b, e in record["batches"].items() if e.get("images_per_s")}
    if rated:
        best = max(rated, key=rated.get)
        record["best_batch"], record["best_images_per_s"] = best, rated[best]


def end_to_end(stages: dict) -> dict:
    """Bounds from per-stage rates: each stage at its best batch, and every stage at one common batch size."""
    chain_256 = [s for s in ("text_encoder", "prior", "decoder", "upsampler_256") if s in stages]
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
        if all("seconds" in e for e in entries):
            same[rows] = round(rows / sum(e["seconds"] for e in entries), 4)
    out["256px_all_stages_at_one_batch_images_per_s"] = same
    return out


def environment(bench: Bench) -> dict:
    import torch

    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "device": str(bench.device), "cudnn_benchmark": torch.backends.cudnn.benchmark}
    for package in ("diffusers", "transformers"):
        with contextlib.suppress(Exception):
            info[package] = __import__(package).__version__
    if bench.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(bench.device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(bench.device).total_memory / 2**30, 1)
    return info


def print_report(results: dict) -> None:
    env = results["environment"]
    print(f"\nGPU benchmark, {env.get('gpu', env['device'])}, {env['date']}; torch {env['torch']}, "
          f"diffusers {env.get('diffusers')}, transformers {env.get('transformers')}")
    models = results.get("models", {})
    print(f"models ({models.get('shapes')}), millions of parameters: {models.get('params_millions')}")
    print(f"attention processors: {models.get('attention')}; text encoder: {models.get('text_attention')}")
    rows = [("stage", "steps", "images/s by batch size", "best batch", "best images/s", "s/image")]
    for name, record in results.get("stages", {}).items():
        if "error" in record:
            rows.append((name, "", record["error"][:80], "", "", ""))
            continue
        cells = []
        for rows_, entry in record["batches"].items():
            cells.append(f"{rows_}:{entry.get('images_per_s') or entry.get('error', entry.get('skipped', '?'))[:12]}")
        steps = record.get("steps")
        if "extrapolated_from_steps" in record:
            steps = f"{steps}*"
        best = record.get("best_images_per_s")
        rows.append((name, steps if steps is not None else "-", " ".join(cells), record.get("best_batch", "-"),
                     best or "-", round(1 / best, 4) if best else "-"))
    baseline = results.get("baseline")
    if baseline:
        cells = [f"{b}:{e.get('images_per_s') or e.get('error', e.get('skipped', '?'))[:12]}"
                 for b, e in baseline["batches"].items()]
        best = baseline.get("best_images_per_s")
        rows.append((f"diffusers UnCLIPPipeline {baseline['dtype']} (256px)", "/".join(
            str(v) for v in baseline["steps"].values()), " ".join(cells), baseline.get("best_batch", "-"),
            best or "-", round(1 / best, 4) if best else "-"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    print()
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    if any("extrapolated_from_steps" in r for r in results.get("stages", {}).values()):
        print("* upsampler_1024: timed at "
              f"{results['stages']['upsampler_1024']['extrapolated_from_steps']} steps, extrapolated to its steps")
    e2e = results.get("end_to_end", {})
    print()
    for key in ("bound_256px_images_per_s", "bound_1024px_images_per_s"):
        if key in e2e:
            print(f"ours, end to end {key.split('_')[1]} (bound 1/sum(1/rate), best batch per stage): "
                  f"{e2e[key]} images/s")
    if e2e.get("256px_all_stages_at_one_batch_images_per_s"):
        print(f"ours, 256px with every stage at one batch size: {e2e['256px_all_stages_at_one_batch_images_per_s']}")
    comparison = results.get("comparison", {})
    for key, value in comparison.items():
        print(f"{key}: {value}")
    print("\ncaveats:")
    for line in results["caveats"]:
        print(f"- {line}")


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
    parser = argparse.ArgumentParser(prog="python -m jobs.gpu_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 steps per stage, batch sizes 1 and 2: a smoke run")
    parser.add_argument("--small", action="store_true",
                        help="toy widths (a CPU check of the script; its figures mean nothing)")
    parser.add_argument("--json", help="also write the figures to this JSON file (rewritten after every sweep)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --small when no GPU)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="our stages' dtype")
    parser.add_argument("--baseline-dtype", default="fp16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per batch size (median reported)")
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
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    bench.results["environment"] = environment(bench)
    bench.results["command"] = "python -m jobs.gpu_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    bench.build_models()
    bench.make_actors()
    bench.pilot()
    bench.save()
    bench.run_ours()
    if not args.no_baseline:
        bench.run_baseline()
    bench.results["comparison"] = compare(bench.results)
    bench.results["wall_s"] = round(time.perf_counter() - bench.started, 1)
    bench.save()
    print_report(bench.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
