"""Stage costs: FLOPs counted on meta tensors from the models' own configs, turned into batch times and memory.

The model, per stage and GPU kind: a batch of b images takes t(b) = a + b * c seconds and holds
weights + b * activations of GPU memory (plus CUDA_CONTEXT_GB per actor process, which the planner adds).

- c = FLOPs per image / (the GPU's dense peak for the dtype x UTILIZATION). FLOPs come from one forward pass of
  each model, built from its config on the meta device (shapes only: no memory, no weights read) and run under
  torch.utils.flop_counter.FlopCounterMode. A stage multiplies them by its sampling steps, by 2 with
  classifier-free guidance (the conditional and unconditional halves run as one doubled batch) and by
  prior.best_of.
- a = kernel launches per batch x KERNEL_OVERHEAD_S: eager PyTorch pays a fixed CPU cost per op it launches,
  whatever the batch, so small batches are launch bound. The launches are the ops the same traced forward
  dispatches.
- UTILIZATION and KERNEL_OVERHEAD_S come from one public measurement, diffusers' A100 Stable Diffusion v1.5
  throughput at batch 1/4/16/64, fitted to t(b) = a + b * c (`reference_fit` redoes the derivation).
- weights = parameters x bytes of the dtype. Activations = the most bytes of tensors alive at once during the
  traced forward (a dispatch mode follows each tensor from the op that makes it until it is freed), per image,
  x ACTIVATION_MARGIN. Attention is traced as the memory-efficient kernel CUDA runs, so no score matrix.

`load_profile` gives the named `dalle2` and `karlo` profiles or a measured JSON profile (`benchmarks.calibrate`
writes them); `checkpoint_profile` counts a run's own checkpoints and settings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.config import STAGE_NAMES, ConfigError, compute_dtype
from pipeline.gpus import GPU_KINDS, GpuKind

GIB = 2**30
"""Every *_gb figure in this module is GiB (2^30 bytes), as torch.cuda reports memory."""
CUDA_CONTEXT_GB = 0.5
"""Memory each actor process spends before it holds a tensor: the CUDA context, cuBLAS/cuDNN handles and loaded
kernels: nvidia-smi shows 0.3-0.5 GiB for a process that has only initialised CUDA, cuBLAS and cuDNN with CUDA's
lazy module loading (the default since CUDA 11.7). The planner adds it once per actor."""
ACTIVATION_MARGIN = 1.1
"""The traced forward's live tensors leave out cuDNN/cuBLAS workspaces and the sampling loop's own tensors
(latents, the guidance concat, scheduler state): 10% on top. Allocator fragmentation is the planner's margin."""
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


REFERENCE_GPU = "a100-40gb"
"""The GPU the utilization was measured on; named profiles are stated on it."""


def gpu_kind(name: str) -> GpuKind:
    """The GpuKind called `name`; a ConfigError (a ValueError) naming the valid kinds otherwise."""
    kind = GPU_KINDS.get(name)
    if kind is None:
        raise ConfigError(f"unknown GPU kind {name!r}; valid kinds: {', '.join(GPU_KINDS)}")
    return kind


# ---------------------------------------------------------------- stage costs and profiles


@dataclass(frozen=True)
class StageCost:
    """One stage on one GPU kind: a batch of b images takes a + b*c seconds and holds weights + b*activations."""

    seconds_per_image: float = 0.0
    """c: seconds each image adds to a batch (its FLOPs at the GPU's sustained rate)."""
    batch_overhead_s: float = 0.0
    """a: seconds a batch costs whatever its size (kernel launches)."""
    weights_gb: float = 0.0
    activation_gb_per_image: float = 0.0

    def batch_seconds(self, images: int) -> float:
        return self.batch_overhead_s + images * self.seconds_per_image

    def seconds_per_image_at(self, images: int) -> float:
        return self.seconds_per_image + self.batch_overhead_s / max(1, images)

    def memory_gb(self, images: int) -> float:
        """Weights and activations of one actor at this batch (CUDA_CONTEXT_GB not included)."""
        return self.weights_gb + self.activation_gb_per_image * images


STAGE_FIELDS = tuple(f.name for f in dataclasses.fields(StageCost))


@dataclass(frozen=True)
class CostProfile:
    """Every stage's cost on one GPU kind, and where the numbers come from."""

    gpu: GpuKind
    stages: dict[str, StageCost]
    source: str
    """One line: where these numbers come from."""
    flops_per_image: dict[str, float] = field(default_factory=dict)
    """FLOPs each stage spends per image, where they were counted (measured profiles have none)."""

    def on(self, gpu: GpuKind) -> CostProfile:
        """The same work on another GPU kind: times scale by the ratio of peak TFLOP/s, memory is unchanged."""
        if gpu == self.gpu:
            return self
        if self.gpu.tflops <= 0 or gpu.tflops <= 0:
            raise ValueError(f"cannot scale costs from {self.gpu.name} to {gpu.name}: a peak TFLOP/s is unknown")
        ratio = self.gpu.tflops / gpu.tflops
        stages = {name: dataclasses.replace(cost, seconds_per_image=cost.seconds_per_image * ratio,
                                            batch_overhead_s=cost.batch_overhead_s * ratio)
                  for name, cost in self.stages.items()}
        return CostProfile(gpu, stages, f"{self.source}; scaled from {self.gpu.name} to {gpu.name} by peak TFLOP/s",
                           dict(self.flops_per_image))

    def to_json(self) -> dict:
        """The JSON profile format `load_profile` reads."""
        known = GPU_KINDS.get(self.gpu.name) == self.gpu
        return {"gpu": self.gpu.name if known else dataclasses.asdict(self.gpu), "source": self.source,
                "stages": {name: dataclasses.asdict(cost) for name, cost in self.stages.items()}}

    def table(self, batches: dict[str, int] | None = None) -> str:
        """A per-stage table; `batches` (images per forward) adds the memory at those batches."""
        total = sum(self.flops_per_image.values())
        lines = [f"{self.source} ({self.gpu.name})",
                 f"{'stage':16s} {'s/image':>9s} {'overhead s':>10s} {'weights GB':>10s} {'act GB/img':>10s} "
                 f"{'TFLOP/img':>10s} {'share':>6s}" + (f" {'batch':>5s} {'GB':>6s}" if batches else "")]
        for name, cost in self.stages.items():
            flops = self.flops_per_image.get(name)
            line = (f"{name:16s} {cost.seconds_per_image:9.4f} {cost.batch_overhead_s:10.4f} {cost.weights_gb:10.2f} "
                    f"{cost.activation_gb_per_image:10.3f} "
                    + (f"{flops / 1e12:10.2f} {flops / total:6.1%}" if flops and total else f"{'-':>10s} {'-':>6s}"))
            if batches and name in batches:
                line += f" {batches[name]:5d} {cost.memory_gb(batches[name]) + CUDA_CONTEXT_GB:6.2f}"
            lines.append(line)
        return "\n".join(lines)


def save_profile(profile: CostProfile, path: str, storage_options: dict | None = None) -> None:
    """Write a profile in the JSON format `load_profile` reads (a local path or any fsspec URL)."""
    from pipeline import storage

    fs, target = storage.filesystem(path, storage_options)
    storage.atomic_write(fs, target, (json.dumps(profile.to_json(), indent=2) + "\n").encode())


PROFILE_NAMES = ("dalle2", "karlo")


def load_profile(name_or_path: str, dtype: str = "fp16") -> CostProfile:
    """A named profile (counted on meta tensors, on REFERENCE_GPU) or a JSON profile file.

    The file format: {"gpu": "a100-40gb", "stages": {"<stage>": {"seconds_per_image": c, "batch_overhead_s": a,
    "weights_gb": w, "activation_gb_per_image": m}}, "source": "..."}; missing fields are 0, "source" is optional.
    `dtype` applies to named profiles only (a file holds what was measured).
    """
    if name_or_path in PROFILE_NAMES:
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
        counted = _karlo_profile(dtype) if name_or_path == "karlo" else _dalle2_profile(dtype)
        # A copy: the counted one is cached for the process, and its dicts are mutable.
        return dataclasses.replace(counted, stages=dict(counted.stages), flops_per_image=dict(counted.flops_per_image))
    if not name_or_path.endswith(".json") and not os.path.exists(name_or_path):
        raise ValueError(f"unknown cost profile {name_or_path!r}: use one of {', '.join(PROFILE_NAMES)} "
                         "or the path of a JSON profile file")
    return _read_profile_file(name_or_path)


def _read_profile_file(path: str) -> CostProfile:
    from pipeline import storage

    def bad(message: str) -> ValueError:
        return ValueError(f"cost profile {path}: {message}")

    try:
        fs, target = storage.filesystem(path)
        raw = storage.read_bytes(fs, target)
    except (OSError, ValueError) as exc:
        raise bad(f"cannot be read ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") \
            from None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise bad(f"is not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or "gpu" not in data or not isinstance(data.get("stages"), dict):
        raise bad('expected a JSON object {"gpu": "<kind>", "stages": {"<stage>": {...}}}')
    unknown = sorted(set(data) - {"gpu", "stages", "source"})
    if unknown:
        raise bad(f"unknown key {unknown[0]!r}; keys are gpu, stages, source")
    gpu = _gpu_from_json(data["gpu"], bad)
    stages = {}
    for name, values in data["stages"].items():
        if name not in STAGE_NAMES:
            raise bad(f"unknown stage {name!r}; stages are {', '.join(STAGE_NAMES)}")
        if not isinstance(values, dict):
            raise bad(f"stages.{name} must be an object of {', '.join(STAGE_FIELDS)}")
        for key, value in values.items():
            if key not in STAGE_FIELDS:
                raise bad(f"stages.{name} has unknown field {key!r}; fields are {', '.join(STAGE_FIELDS)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise bad(f"stages.{name}.{key} must be a number >= 0, got {value!r}")
        stages[name] = StageCost(**{k: float(v) for k, v in values.items()})
    return CostProfile(gpu, stages, str(data.get("source") or f"profile file {path}"))


def _gpu_from_json(value, bad: Callable[[str], ValueError]) -> GpuKind:
    """A GPU_KINDS name, or for a device not listed there (a calibration on it) the GpuKind's fields."""
    if isinstance(value, str):
        if value not in GPU_KINDS:
            raise bad(f"unknown gpu {value!r}; valid kinds: {', '.join(GPU_KINDS)} (or an object with "
                      "name, memory_gb and tflops)")
        return GPU_KINDS[value]
    fields = tuple(f.name for f in dataclasses.fields(GpuKind))
    numbers = [value.get(k, 0) for k in fields[1:]] if isinstance(value, dict) else []
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or set(value) - set(fields) \
            or not {"memory_gb", "tflops"} <= set(value) \
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in numbers):
        raise bad(f"gpu must be one of {', '.join(GPU_KINDS)} or an object with name, memory_gb, tflops "
                  f"(numbers >= 0), got {value!r}")
    return GpuKind(**value)


# ---------------------------------------------------------------- counting one forward pass on meta tensors


@dataclass(frozen=True)
class ForwardCount:
    """One forward pass, counted on meta tensors."""

    flops: float
    """As torch.utils.flop_counter counts them: 2 per multiply-add of matmuls, convolutions and attention."""
    peak_bytes: float
    """Most bytes of tensors alive at once during the pass (its inputs included, weights not)."""
    kernels: int
    """Ops dispatched that make new data (views excluded): about one CUDA kernel launch each."""


def count_forward(run: Callable[[], Any]) -> ForwardCount:
    """Count `run()`, which makes its inputs on the meta device and calls a meta model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    live_tensors, efficient_attention = _tracing_modes()
    live = live_tensors()
    with torch.no_grad(), efficient_attention(), FlopCounterMode(display=False) as flops, live:
        run()
    return ForwardCount(float(flops.get_total_flops()), float(live.peak_bytes), live.kernels)


@functools.cache
def _tracing_modes():
    """The two modes count_forward runs under (defined on first use: importing torch is slow)."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LiveTensors(TorchDispatchMode):
        """Follows the storage every op creates until its last tensor is freed; keeps the peak of their bytes."""

        def __init__(self):
            super().__init__()
            self.live_bytes = self.peak_bytes = self.kernels = 0
            self.holders: dict[int, int] = {}  # storage -> tensors still holding it

        def _release(self, key: int, nbytes: int) -> None:
            self.holders[key] -= 1
            if not self.holders[key]:
                del self.holders[key]
                self.live_bytes -= nbytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                self.kernels += 1
            # A storage an input already has is a view or an in-place result, not new memory; storages made
            # outside the trace (weights) are not followed at all.
            inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for tensor in tree_leaves(out):
                if not isinstance(tensor, torch.Tensor):
                    continue
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self.holders:
                    if key in inputs:
                        continue
                    self.holders[key] = 0
                    self.live_bytes += storage.nbytes()
                    self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                self.holders[key] += 1
                weakref.finalize(tensor, self._release, key, storage.nbytes())
            return out

    class EfficientAttention(TorchFunctionMode):
        """Traces scaled_dot_product_attention as the memory-efficient kernel CUDA runs (on meta tensors torch
        would use the math fallback, which materialises the L x S score matrix the GPU never holds)."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not F.scaled_dot_product_attention:
                return func(*args, **kwargs)
            return _efficient_attention(*args, **kwargs)

    def _efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                             enable_gqa=False):
        bias = None
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # on meta only the shape matters: an additive mask of that shape
                attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
            bias = attn_mask.expand(query.shape[:-1] + (key.shape[-2],))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, False, dropout_p, is_causal, scale=scale)[0]

    return LiveTensors, EfficientAttention


def _meta_tensor(*shape: int, dtype=None):
    import torch

    return torch.empty(shape, dtype=dtype, device="meta")


@dataclass(frozen=True)
class ModelConfig:
    """A model class and its config, as the checkpoint's config.json has it."""

    cls: Any
    config: dict

    def build(self, dtype: str):
        """The model on the meta device, in `dtype`."""
        import torch

        with torch.device("meta"):
            if hasattr(self.cls, "from_config"):  # diffusers
                model = self.cls.from_config(self.config)
            else:  # transformers
                model = self.cls(self.cls.config_class.from_dict(self.config))
        # nn.Module.to: diffusers' own override warns about fp32-kept modules, irrelevant on meta.
        return torch.nn.Module.to(model, _torch_dtype(dtype)).eval()


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


_TRACED: dict[tuple, tuple[int, ForwardCount]] = {}


def traced(spec: ModelConfig, dtype: str, recipe: Callable[..., Any], *args) -> tuple[int, ForwardCount]:
    """(parameters, count of `recipe(model, *args)`) for the model of `spec` in `dtype`, once per process: the same
    configs come back across profiles and stages."""
    key = (spec.cls.__module__, spec.cls.__qualname__, json.dumps(spec.config, sort_keys=True, default=str), dtype,
           recipe.__name__, args)
    if key not in _TRACED:
        model = spec.build(dtype)
        _TRACED[key] = (_params(model), count_forward(lambda: recipe(model, *args)))
    return _TRACED[key]


# ---------------------------------------------------------------- one forward of each kind of model, on meta inputs
# Each recipe makes the inputs one image needs (`samples`: 2 with guidance, x best_of) and calls the model.


def run_text_tower(model, samples: int, tokens: int | None):
    """A CLIP text encoder on padded prompts (tokenizers pad to the 77-token maximum)."""
    import torch

    return model(input_ids=_meta_tensor(samples, tokens or model.config.max_position_embeddings, dtype=torch.long))


def run_prior(model, samples: int):
    """PriorTransformer: noised image embedding, timestep, CLIP text embedding and the text encoder's tokens."""
    import torch

    cfg, dtype = model.config, model.dtype
    width, tokens = cfg.embedding_dim, cfg.num_embeddings
    return model(hidden_states=_meta_tensor(samples, width, dtype=dtype), timestep=_meta_tensor(dtype=torch.long),
                 proj_embedding=_meta_tensor(samples, cfg.embedding_proj_dim or width, dtype=dtype),
                 encoder_hidden_states=_meta_tensor(samples, tokens, width, dtype=dtype),
                 attention_mask=_meta_tensor(samples, tokens, dtype=torch.bool))


def run_text_proj(model, guidance: bool, text_tokens: int):
    """UnCLIPTextProjModel: one image embedding (it adds the learned unconditional one itself with guidance)."""
    width, dtype, samples = model.config.clip_embeddings_dim, model.dtype, 2 if guidance else 1
    return model(image_embeddings=_meta_tensor(1, width, dtype=dtype),
                 prompt_embeds=_meta_tensor(samples, width, dtype=dtype),
                 text_encoder_hidden_states=_meta_tensor(samples, text_tokens, width, dtype=dtype),
                 do_classifier_free_guidance=guidance)


def run_decoder_unet(model, samples: int, context_tokens: int):
    """The unCLIP decoder's UNet2DConditionModel: text context, and the CLIP embedding as class embedding."""
    import torch

    cfg, dtype = model.config, model.dtype
    time_width = cfg.time_embedding_dim or cfg.block_out_channels[0] * 4
    return model(sample=_meta_tensor(samples, cfg.in_channels, cfg.sample_size, cfg.sample_size, dtype=dtype),
                 timestep=_meta_tensor(dtype=torch.long),
                 encoder_hidden_states=_meta_tensor(samples, context_tokens, cfg.cross_attention_dim, dtype=dtype),
                 class_labels=_meta_tensor(samples, time_width, dtype=dtype),
                 attention_mask=_meta_tensor(samples, context_tokens, dtype=torch.bool))


def run_pixel_unet(model, size: int):
    """A super-resolution UNet2DModel: the noisy image concatenated with the upsampled low-res one."""
    import torch

    return model(sample=_meta_tensor(1, model.config.in_channels, size, size, dtype=model.dtype),
                 timestep=_meta_tensor(dtype=torch.long))


def run_latent_unet(model, samples: int, size: int, text_tokens: int):
    """A latent UNet2DConditionModel with text context: the x4 upscaler's (latents + noised low-res image, a
    noise-level class) or Stable Diffusion's (which ignores the class)."""
    import torch

    cfg, dtype = model.config, model.dtype
    return model(_meta_tensor(samples, cfg.in_channels, size, size, dtype=dtype), _meta_tensor(dtype=torch.long),
                 encoder_hidden_states=_meta_tensor(samples, text_tokens, cfg.cross_attention_dim, dtype=dtype),
                 class_labels=_meta_tensor(samples, dtype=torch.long))


def run_vae_decode(model, latent_size: int):
    """AutoencoderKL.decode of one image's latents."""
    return model.decode(_meta_tensor(1, model.config.latent_channels, latent_size, latent_size, dtype=model.dtype))


def run_clip_text(model):
    """CLIPModel's text tower and projection on one padded prompt."""
    import torch

    return model.get_text_features(
        input_ids=_meta_tensor(1, model.config.text_config.max_position_embeddings, dtype=torch.long))


def run_image_encoder(model):
    """CLIPVisionModelWithProjection on one image at its resolution (the image modes' encoder)."""
    cfg = model.config
    return model(pixel_values=_meta_tensor(1, cfg.num_channels, cfg.image_size, cfg.image_size,
                                           dtype=model.dtype)).image_embeds


def run_clip_image(model):
    """CLIPModel's vision tower and projection on one image at the tower's resolution."""
    vision = model.config.vision_config
    return model.get_image_features(pixel_values=_meta_tensor(
        1, vision.num_channels, vision.image_size, vision.image_size, dtype=model.dtype))


# ---------------------------------------------------------------- what each stage runs


@dataclass(frozen=True)
class ModelWork:
    """One model's share of a stage: per image, and per batch whatever its size."""

    name: str
    dtype: str
    weight_bytes: float
    flops_per_image: float
    kernels_per_batch: float
    activation_bytes_per_image: float
    params: int = 0


def model_work(name: str, spec: ModelConfig, dtype: str, recipe: Callable[..., Any], *args,
               calls: int = 1, weights: bool = True) -> ModelWork:
    """A model that runs `recipe` `calls` times per batch (its sampling steps; 0: loaded, never run)."""
    params, forward = traced(spec, dtype, recipe, *args)
    return ModelWork(name, dtype, params * DTYPE_BYTES[dtype] if weights else 0.0, forward.flops * calls,
                     forward.kernels * calls, forward.peak_bytes if calls else 0.0, params if weights else 0)


def text_tower_work(name: str, spec: ModelConfig, dtype: str, samples: int = 1, tokens: int | None = None,
                    calls: int = 1) -> ModelWork:
    return model_work(name, spec, dtype, run_text_tower, samples, tokens, calls=calls)


def prior_work(spec: ModelConfig, dtype: str, steps: int, samples: int) -> ModelWork:
    return model_work("prior", spec, dtype, run_prior, samples, calls=steps)


def text_proj_work(spec: ModelConfig, dtype: str, guidance: bool, text_tokens: int) -> ModelWork:
    return model_work("text_proj", spec, dtype, run_text_proj, guidance, text_tokens)


def decoder_unet_work(spec: ModelConfig, dtype: str, steps: int, samples: int, context_tokens: int) -> ModelWork:
    return model_work("decoder", spec, dtype, run_decoder_unet, samples, context_tokens, calls=steps)


def pixel_unet_work(name: str, spec: ModelConfig, dtype: str, steps: int, size: int) -> ModelWork:
    return model_work(name, spec, dtype, run_pixel_unet, size, calls=steps)


def latent_upscaler_work(spec: ModelConfig, dtype: str, steps: int, samples: int, size: int,
                         text_tokens: int) -> ModelWork:
    return model_work("unet", spec, dtype, run_latent_unet, samples, size, text_tokens, calls=steps)


def vae_decode_work(spec: ModelConfig, dtype: str, latent_size: int) -> ModelWork:
    """The VAE's decoder once per image (its encoder is loaded, never run)."""
    return model_work("vae", spec, dtype, run_vae_decode, latent_size)


def clip_scoring_work(spec: ModelConfig, dtype: str) -> list[ModelWork]:
    """CLIPModel scoring one candidate: the text tower on its prompt, the vision tower on its image. The whole
    model's weights count once."""
    return [model_work("clip_text", spec, dtype, run_clip_text),
            model_work("clip_vision", spec, dtype, run_clip_image, weights=False)]


def stage_cost(works: list[ModelWork], gpu: GpuKind) -> StageCost:
    """The time and memory model applied to what a stage runs."""
    seconds = sum(w.flops_per_image / (gpu.peak_flops(w.dtype) * UTILIZATION) for w in works)
    return StageCost(
        seconds_per_image=seconds,
        batch_overhead_s=sum(w.kernels_per_batch for w in works) * KERNEL_OVERHEAD_S,
        weights_gb=sum(w.weight_bytes for w in works) / GIB,
        # The models of a stage run one after another: its working set is the largest of theirs.
        activation_gb_per_image=ACTIVATION_MARGIN * max((w.activation_bytes_per_image for w in works), default=0.0)
        / GIB,
    )


def profile_from_works(works: dict[str, list[ModelWork]], gpu: GpuKind, source: str) -> CostProfile:
    return CostProfile(gpu, {name: stage_cost(parts, gpu) for name, parts in works.items()}, source,
                       {name: sum(w.flops_per_image for w in parts) for name, parts in works.items()})


# ---------------------------------------------------------------- the unCLIP pipeline (Karlo layout) with settings


@dataclass(frozen=True)
class UnclipSettings:
    """What the cost of a Karlo-layout run depends on besides its models."""

    prior_steps: int = 25
    prior_guidance_scale: float = 4.0
    decoder_steps: int = 25
    decoder_guidance_scale: float = 8.0
    super_res_steps: int = 7
    upsampler_1024_steps: int = 75
    upsampler_1024_guidance_scale: float = 9.0
    best_of: int = 1
    image_mode: bool = False
    """Embeddings come from input images (no prior): guidance is decided by the decoder's scale alone."""
    dtypes: dict[str, str] = field(default_factory=dict)
    """Per stage; a missing stage computes in fp16."""

    @property
    def unclip_guidance(self) -> bool:
        """Prior, text projection and decoder use guidance when either scale asks for it, decided once for the
        three as diffusers' UnCLIPPipeline does (the image modes: the decoder's scale)."""
        if self.image_mode:
            return self.decoder_guidance_scale > 1
        return self.prior_guidance_scale > 1 or self.decoder_guidance_scale > 1

    def dtype(self, stage: str) -> str:
        return self.dtypes.get(stage, "fp16")


def unclip_works(models: dict[str, ModelConfig], settings: UnclipSettings) -> dict[str, list[ModelWork]]:
    """What each stage runs per image and per batch. `models` holds the Karlo components (text_encoder, prior,
    text_proj, decoder, super_res_first, super_res_last) and optionally x4_unet, x4_vae, x4_text_encoder, clip."""
    guided = 2 if settings.unclip_guidance else 1
    text_tokens = models["text_encoder"].config.get("max_position_embeddings", 77)
    extra_tokens = models["text_proj"].config.get("clip_extra_context_tokens", 4)
    dtype = settings.dtype
    works = {
        "decoder": [text_proj_work(models["text_proj"], dtype("decoder"), settings.unclip_guidance, text_tokens),
                    decoder_unet_work(models["decoder"], dtype("decoder"), settings.decoder_steps, guided,
                                      text_tokens + extra_tokens)],
    }
    if "image_encoder" in models:
        # One image per row; the '' text encoding is computed once when the actor loads (weights held, then freed).
        works["image_encoder"] = [model_work("image_encoder", models["image_encoder"], dtype("image_encoder"),
                                             run_image_encoder)]
    else:
        # One prompt per row: the unconditional encoding is computed once when the actor loads.
        works["text_encoder"] = [text_tower_work("text_encoder", models["text_encoder"], dtype("text_encoder"))]
        # best_of samples run inside the same forwards: m x the FLOPs and activations, the same launches.
        works["prior"] = [prior_work(models["prior"], dtype("prior"), settings.prior_steps, guided * settings.best_of)]
    size = models["super_res_first"].config["sample_size"]
    # super_res_first for every step but the last, super_res_last for the last (both loaded).
    works["upsampler_256"] = [
        pixel_unet_work("super_res_first", models["super_res_first"], dtype("upsampler_256"),
                        settings.super_res_steps - 1, size),
        pixel_unet_work("super_res_last", models["super_res_last"], dtype("upsampler_256"), 1, size)]
    if "x4_unet" in models:
        works["upsampler_1024"] = upscaler_works(models, dtype("upsampler_1024"), settings.upsampler_1024_steps,
                                                 settings.upsampler_1024_guidance_scale > 1, latent_size=size)
    if "clip" in models:
        works["reranker"] = clip_scoring_work(models["clip"], dtype("reranker"))
    return works


def upscaler_works(models: dict[str, ModelConfig], dtype: str, steps: int, guidance: bool,
                   latent_size: int) -> list[ModelWork]:
    """x4 upscaler on one image: prompt encodings (and '' with guidance), the UNet on latents of the input's size,
    one VAE decode to 4x that size; the VAE decodes in fp32 when fp16 and its config forces the upcast."""
    guided = 2 if guidance else 1
    text = models["x4_text_encoder"]
    vae = models["x4_vae"]
    vae_dtype = "fp32" if dtype == "fp16" and vae.config.get("force_upcast", True) else dtype
    return [text_tower_work("text_encoder", text, dtype, calls=guided),
            latent_upscaler_work(models["x4_unet"], dtype, steps, guided, latent_size,
                                 text.config.get("max_position_embeddings", 77)),
            vae_decode_work(vae, vae_dtype, latent_size)]


# ---------------------------------------------------------------- named profiles

MODEL_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")


def shipped_config(relative: str) -> dict:
    """A config.json shipped under pipeline/model_configs."""
    with open(os.path.join(MODEL_CONFIGS, relative), encoding="utf-8") as fh:
        return json.load(fh)


def karlo_models() -> dict[str, ModelConfig]:
    """The real configs, shipped as JSON under pipeline/model_configs (architecture keys only; the rest default).

    karlo-v1-alpha/*: kakaobrain/karlo-v1-alpha as diffusers' Karlo conversion script writes it: the decoder and
    super_res_first/_last dicts are the script's hard-coded configs, the prior uses PriorTransformer's defaults
    (which are Karlo's prior_1B_vit_l: width 2048 = 32 x 64, 20 layers, CLIP dim 768), text_proj follows from the
    decoder (time_embed_dim = 4 x 320, cross_attention_dim 1536), and the text encoder is CLIP ViT-L/14's.
    stable-diffusion-x4-upscaler/*: the UNet and VAE translated from Stability's x4-upscaling.yaml (model_channels
    256, channel_mult 1,2,2,4, attention at 2,4,8 with self-attention only at the lowest resolution, 8 heads,
    context 1024, 1000 noise-level classes, 7 input channels; VAE ch 128, mult 1,2,4, 2 blocks, 4 latent
    channels, scale 0.08333) in the keys diffusers' converter uses; its text encoder is OpenCLIP ViT-H/14's text
    tower cut before the last block (penultimate layer: 23 of 24 blocks, width 1024), as in Stable Diffusion 2.
    clip-vit-large-patch14/config.json: openai/clip-vit-large-patch14.
    """
    import diffusers
    import transformers
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    karlo = "karlo-v1-alpha/"
    x4 = "stable-diffusion-x4-upscaler/"
    return {
        "text_encoder": ModelConfig(transformers.CLIPTextModelWithProjection,
                                    shipped_config(karlo + "text_encoder.json")),
        "prior": ModelConfig(diffusers.PriorTransformer, shipped_config(karlo + "prior.json")),
        "text_proj": ModelConfig(UnCLIPTextProjModel, shipped_config(karlo + "text_proj.json")),
        "decoder": ModelConfig(diffusers.UNet2DConditionModel, shipped_config(karlo + "decoder.json")),
        "super_res_first": ModelConfig(diffusers.UNet2DModel, shipped_config(karlo + "super_res_first.json")),
        "super_res_last": ModelConfig(diffusers.UNet2DModel, shipped_config(karlo + "super_res_last.json")),
        "x4_unet": ModelConfig(diffusers.UNet2DConditionModel, shipped_config(x4 + "unet.json")),
        "x4_vae": ModelConfig(diffusers.AutoencoderKL, shipped_config(x4 + "vae.json")),
        "x4_text_encoder": ModelConfig(transformers.CLIPTextModel, shipped_config(x4 + "text_encoder.json")),
        "clip": ModelConfig(transformers.CLIPModel, shipped_config("clip-vit-large-patch14/config.json")),
    }


# Karlo's defaults (its model card and diffusers' UnCLIPPipeline: prior 25 steps at guidance 4, decoder 25 at 8,
# super-res 7) and StableDiffusionUpscalePipeline's (75 steps at guidance 9).
KARLO_SETTINGS = UnclipSettings(prior_steps=25, prior_guidance_scale=4.0, decoder_steps=25, decoder_guidance_scale=8.0,
                                super_res_steps=7, upsampler_1024_steps=75, upsampler_1024_guidance_scale=9.0)


@functools.lru_cache(maxsize=None)
def _karlo_profile(dtype: str) -> CostProfile:
    settings = dataclasses.replace(KARLO_SETTINGS, dtypes={name: dtype for name in STAGE_NAMES})
    return profile_from_works(unclip_works(karlo_models(), settings), gpu_kind(REFERENCE_GPU),
                              f"karlo: Karlo + x4 upscaler + CLIP ViT-L/14 configs counted on meta tensors, {dtype}")


def dalle2_models() -> dict[str, ModelConfig]:
    """DALL-E 2 (Ramesh et al. 2022) rebuilt from the paper's hyperparameters: it has no public configs.

    Each model is the diffusers/transformers class closest to the paper's description, so its FLOPs are counted
    on meta like a real checkpoint's. Built, they have the paper's sizes: prior 1.02B (paper 1B), decoder
    2.24B UNet + 1.31B text Transformer = 3.55B (3.5B), upsamplers 0.69B (700M) and 0.27B (300M), CLIP 0.99B.
    """
    import diffusers
    import transformers

    clip = ModelConfig(transformers.CLIPModel, {
        # The paper's CLIP: ViT-H/16 image encoder on 256x256 images, width 1280, 32 blocks; text Transformer
        # width 1024, 24 blocks (causal mask). Heads and MLP widths as ViT-H (16 heads, 4x MLP); 77-token context
        # and 1024-wide embeddings as OpenAI's CLIP releases.
        "projection_dim": 1024,
        "text_config": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                        "intermediate_size": 4096, "max_position_embeddings": 77, "vocab_size": 49408,
                        "projection_dim": 1024},
        "vision_config": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16,
                          "intermediate_size": 5120, "image_size": 256, "patch_size": 16, "projection_dim": 1024},
    })
    text_encoder = ModelConfig(transformers.CLIPTextModelWithProjection, clip.config["text_config"])
    # Diffusion prior: 1B parameters, a decoder-only Transformer over text tokens, CLIP text embedding, timestep,
    # noised image embedding and an output token (77 + 4): PriorTransformer's layout. Width 2048 (32 heads of 64)
    # and 20 layers give the paper's 1B (Karlo's 1B prior has this shape).
    prior = ModelConfig(diffusers.PriorTransformer, {
        "num_attention_heads": 32, "attention_head_dim": 64, "num_layers": 20, "embedding_dim": 1024,
        "num_embeddings": 77, "additional_embeddings": 4})
    # Decoder: 3.5B, GLIDE's architecture (Nichol et al. 2021) at 64 px: UNet with 512 base channels, 3 residual
    # blocks per resolution, channel multipliers 1,2,3,4, attention (64-channel heads) at 32, 16 and 8 px attending
    # to the text context, CLIP embedding added to the timestep embedding, learned variance (6 output channels).
    decoder = ModelConfig(diffusers.UNet2DConditionModel, {
        "sample_size": 64, "in_channels": 3, "out_channels": 6, "layers_per_block": 3,
        "block_out_channels": [512, 1024, 1536, 2048], "attention_head_dim": 64, "cross_attention_dim": 2048,
        "down_block_types": ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
        "up_block_types": ["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "class_embed_type": "identity",
        "resnet_time_scale_shift": "scale_shift"})
    # ...and GLIDE's text Transformer, which the decoder keeps: width 2048, 24 blocks (32 heads, 4x MLP) over a
    # 128-token context, about 1.2B of the 3.5B. Encoded once per image (its output does not depend on the step).
    decoder_text = ModelConfig(transformers.CLIPTextModel, {
        "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32, "intermediate_size": 8192,
        "max_position_embeddings": 128, "vocab_size": 50257})
    # Upsamplers: no attention, conditioned on the bicubic-upsampled lower resolution image (6 input channels).
    # 64 -> 256: 700M, 320 base channels, 3 blocks per resolution, multipliers 1,2,3,4 (Karlo's super-res shape).
    upsampler_256 = ModelConfig(diffusers.UNet2DModel, {
        "sample_size": 256, "in_channels": 6, "out_channels": 3, "layers_per_block": 3, "add_attention": False,
        "block_out_channels": [320, 640, 960, 1280], "down_block_types": ["ResnetDownsampleBlock2D"] * 4,
        "up_block_types": ["ResnetUpsampleBlock2D"] * 4})
    # 256 -> 1024: 300M, 192 base channels, 2 blocks per resolution, multipliers 1,1,2,2,4,4.
    upsampler_1024 = ModelConfig(diffusers.UNet2DModel, {
        "sample_size": 1024, "in_channels": 6, "out_channels": 3, "layers_per_block": 2, "add_attention": False,
        "block_out_channels": [192, 192, 384, 384, 768, 768], "down_block_types": ["ResnetDownsampleBlock2D"] * 6,
        "up_block_types": ["ResnetUpsampleBlock2D"] * 6})
    return {"clip": clip, "text_encoder": text_encoder, "prior": prior, "decoder": decoder,
            "decoder_text": decoder_text, "upsampler_256": upsampler_256, "upsampler_1024": upsampler_1024}


# The paper's sampling steps; guidance on the prior and the decoder only.
DALLE2_STEPS = {"prior": 64, "decoder": 250, "upsampler_256": 27, "upsampler_1024": 15}


def dalle2_works(dtype: str = "fp16") -> dict[str, list[ModelWork]]:
    models = dalle2_models()
    return {
        "text_encoder": [text_tower_work("text_encoder", models["text_encoder"], dtype)],
        "prior": [prior_work(models["prior"], dtype, DALLE2_STEPS["prior"], samples=2)],
        # GLIDE's text context: 128 tokens, and the 4 extra tokens the CLIP image embedding is projected to.
        "decoder": [text_tower_work("decoder_text", models["decoder_text"], dtype, samples=2),
                    decoder_unet_work(models["decoder"], dtype, DALLE2_STEPS["decoder"], samples=2,
                                      context_tokens=128 + 4)],
        "reranker": clip_scoring_work(models["clip"], dtype),
        "upsampler_256": [pixel_unet_work("upsampler_256", models["upsampler_256"], dtype,
                                          DALLE2_STEPS["upsampler_256"], size=256)],
        "upsampler_1024": [pixel_unet_work("upsampler_1024", models["upsampler_1024"], dtype,
                                           DALLE2_STEPS["upsampler_1024"], size=1024)],
    }


@functools.lru_cache(maxsize=None)
def _dalle2_profile(dtype: str) -> CostProfile:
    return profile_from_works(dalle2_works(dtype), gpu_kind(REFERENCE_GPU),
                              f"dalle2: DALL-E 2 paper sizes rebuilt as UNets/Transformers, counted on meta, {dtype}")


def profile_costs(name: str) -> dict[str, float]:
    """Seconds per image of each stage under a named profile (the per-image term, without batch overhead)."""
    return {stage: cost.seconds_per_image for stage, cost in load_profile(name).stages.items()}


# ---------------------------------------------------------------- a run's own checkpoints


def checkpoint_models(config) -> dict[str, ModelConfig]:
    """The run's components, from their config.json files only (through pipeline.checkpoints / storage)."""
    from pipeline import checkpoints, storage

    layouts = config.model_layouts()

    def component(source_key: str, name: str) -> ModelConfig:
        source = getattr(config.models, source_key)
        part = checkpoints.LAYOUTS[layouts[source_key]].components[name]
        if source.startswith(checkpoints.TINY_SCHEME):
            source = checkpoints.local_dir(source, layouts[source_key])
        fs, root = storage.filesystem(source, config.storage_options)
        path = storage.join(root, *([part.subfolder] if part.subfolder else []), "config.json")
        values = json.loads(storage.read_bytes(fs, path))
        if name == "image_encoder" and "vision_config" in values:  # a CLIPModel snapshot: its vision tower
            values = values["vision_config"]
        return ModelConfig(checkpoints._import(part.cls), values)

    names = ["text_encoder", "text_proj", "decoder", "super_res_first", "super_res_last"]
    models = {name: component("unclip", name) for name in names + ([] if config.image_mode else ["prior"])}
    if config.image_mode:
        models["image_encoder"] = component(config.image_encoder_source, "image_encoder")
    if config.models.upsampler_1024 is not None:
        models.update(x4_unet=component("upsampler_1024", "unet"), x4_vae=component("upsampler_1024", "vae"),
                      x4_text_encoder=component("upsampler_1024", "text_encoder"))
    if config.models.clip is not None:
        models["clip"] = component("clip", "model")
    return models


def run_settings(config) -> UnclipSettings:
    """Steps, guidance, best_of and per-stage dtypes of a run ('auto' computes in fp16 on a GPU)."""
    stages = config.stages

    return UnclipSettings(
        prior_steps=stages.prior.steps, prior_guidance_scale=stages.prior.guidance_scale,
        decoder_steps=stages.decoder.steps, decoder_guidance_scale=stages.decoder.guidance_scale,
        super_res_steps=stages.upsampler_256.steps, upsampler_1024_steps=stages.upsampler_1024.steps,
        upsampler_1024_guidance_scale=stages.upsampler_1024.guidance_scale, best_of=config.prior.best_of,
        image_mode=config.image_mode,
        dtypes={name: compute_dtype(config, name, "cuda") for name in STAGE_NAMES})


def checkpoint_profile(config, gpu: GpuKind | None = None) -> CostProfile:
    """The run's own checkpoints (config files only) and settings, counted on meta tensors, on `gpu`
    (default REFERENCE_GPU)."""
    gpu = gpu or gpu_kind(REFERENCE_GPU)
    return profile_from_works(unclip_works(checkpoint_models(config), run_settings(config)), gpu,
                              "the run's checkpoint configs and settings, counted on meta tensors")


def estimated_costs(config) -> dict[str, float]:
    """Seconds per image of each stage of this run at its configured batch sizes (overhead amortised)."""
    profile = checkpoint_profile(config)
    return {name: cost.seconds_per_image_at(getattr(config.stages, name).batch_images())
            for name, cost in profile.stages.items()}


# ---------------------------------------------------------------- where UTILIZATION and KERNEL_OVERHEAD_S come from

# diffusers' A100 benchmark of StableDiffusionPipeline (runwayml/stable-diffusion-v1-5, 512 px, 50 steps,
# guidance 7.5, fp16, SDPA attention, no torch.compile): images per second at each batch size.
SD_REFERENCE_IMAGES_PER_S = {1: 0.51, 4: 1.03, 16: 1.18, 64: 1.21}
SD_REFERENCE_STEPS = 50

# What reference_fit() returns, kept as constants so planning never re-derives them (test_costs checks they agree):
# the fit gives a = 1.114 s per batch and c = 0.771 s per image for SD v1.5, whose 50 guided UNet passes, VAE
# decode and two prompt encodings count 82.9 TFLOP per image and 41,900 kernel launches per batch.
UTILIZATION = 0.344
"""Sustained share of the dense fp16 peak: SD v1.5's 82.9 TFLOP per image / (0.771 s x 312 TFLOP/s)."""
KERNEL_OVERHEAD_S = 2.66e-5
"""Seconds per launched op: SD v1.5's 1.114 s per batch / its 41,900 launches (~27 us: eager PyTorch's
Python dispatch and launch cost, which a batch-1 diffusion step is bound by). The reference's launches are
counted by the same trace as every stage's, so what the trace takes for a launch cancels out."""


def fit_batch_times(images_per_s: dict[int, float]) -> tuple[float, float]:
    """(a, c) of t(b) = a + b*c through measured throughputs, least squares on relative error."""
    import numpy as np

    batches = np.array(sorted(images_per_s), dtype=float)
    times = batches / np.array([images_per_s[int(b)] for b in batches])
    weights = 1.0 / times
    design = np.stack([np.ones_like(batches), batches], axis=1) * weights[:, None]
    (overhead, per_image), *_ = np.linalg.lstsq(design, times * weights, rcond=None)
    return float(overhead), float(per_image)


def reference_fit() -> dict[str, float]:
    """UTILIZATION and KERNEL_OVERHEAD_S derived again: SD v1.5 counted on meta, fitted to the A100 table."""
    import diffusers
    import transformers

    unet = ModelConfig(diffusers.UNet2DConditionModel, shipped_config("stable-diffusion-v1-5/unet.json"))
    vae = ModelConfig(diffusers.AutoencoderKL, shipped_config("stable-diffusion-v1-5/vae.json"))
    text = ModelConfig(transformers.CLIPTextModel, shipped_config("clip-vit-large-patch14/config.json")["text_config"])
    latents = unet.config["sample_size"]
    # Per image: prompt and negative prompt encoded, 50 UNet passes on a guidance-doubled batch, one VAE decode.
    works = [text_tower_work("text_encoder", text, "fp16", calls=2),
             model_work("unet", unet, "fp16", run_latent_unet, 2, latents, 77, calls=SD_REFERENCE_STEPS),
             vae_decode_work(vae, "fp16", latents)]
    overhead, per_image = fit_batch_times(SD_REFERENCE_IMAGES_PER_S)
    flops = sum(w.flops_per_image for w in works)
    kernels = sum(w.kernels_per_batch for w in works)
    peak = gpu_kind(REFERENCE_GPU).peak_flops("fp16")
    return {"batch_overhead_s": overhead, "seconds_per_image": per_image, "flops_per_image": flops,
            "kernels_per_batch": kernels, "utilization": flops / (per_image * peak), "kernel_overhead_s": overhead / kernels}
