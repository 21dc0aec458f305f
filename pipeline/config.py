"""Run configuration: typed dataclasses, YAML loading, `--set dotted.key=value` overrides and validation."""

from __future__ import annotations

import dataclasses
from datetime import date
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline import window
from pipeline.gpus import GPU_KINDS

DTYPES = ("auto", "fp32", "fp16", "bf16")
OUTPUT_FORMATS = ("files", "webdataset")
IMAGE_FORMATS = ("png", "webp", "jpeg")
IMAGE_FORMAT_ALIASES = {"jpg": "jpeg"}
OUTPUT_MODES = ("resume", "overwrite", "error_if_exists")
RERANK_AT = ("decoder", "upsampler_256")
DEFAULT_ID_COLUMN = "id"
DEFAULT_SEED_COLUMN = "seed"
MODES = ("text", "variation", "interpolation", "textdiff")
"""What a run decodes: `text` samples image embeddings from prompts with the prior; the image modes take them
from images with the CLIP image encoder (DALL-E 2's variations, interpolations and text diffs)."""
IMAGE_MODES = MODES[1:]
IMAGE_EMBEDDING_COLUMN = "image_embedding"
"""Optional input column of variation mode: a raw CLIP image embedding (list<float>) used instead of the image."""
INTERPOLATION_COLUMNS = ("image_a", "image_b")
"""The two images of each interpolation row."""
TARGET_PROMPT_COLUMN = "target_prompt"
"""The caption a textdiff row moves its image toward."""
THETA_MAX_COLUMN = "theta_max"
"""Optional textdiff input column: the row's own textdiff.theta_max (null: the configured one)."""
FRAME_THETA_COLUMN = "frame_theta"
"""Per row, the theta of each frame, handed from the image encoder to the metadata (interpolation and textdiff)."""
FRAMES_COLUMN = "frames"
"""Optional interpolation / textdiff input column: the row's own number of frames, from 2 up to the configured
<mode>.frames (null: the configured number). Handed on from the image encoder as the count each row keeps."""


class ConfigError(ValueError):
    """A run-level configuration problem; its message is one line a user can act on."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_stage_common(stage: "StageConfig", name: str) -> None:
    _require(stage.batch_size == "auto" or (isinstance(stage.batch_size, int) and not isinstance(stage.batch_size, bool)
                                            and stage.batch_size >= 1),
             f"stages.{name}.batch_size must be 'auto' or an integer >= 1 (images per forward pass), "
             f"got {stage.batch_size!r}")
    _require(stage.num_gpus == "auto" or (isinstance(stage.num_gpus, (int, float)) and 0 <= stage.num_gpus <= 1),
             f"stages.{name}.num_gpus must be 'auto' or the GPU fraction of one actor, 0 (run on CPU) to 1, "
             f"got {stage.num_gpus!r}")
    _require(stage.num_cpus is None or (isinstance(stage.num_cpus, (int, float)) and stage.num_cpus > 0),
             f"stages.{name}.num_cpus must be null or a positive number of CPUs per actor, got {stage.num_cpus!r}")
    _require(stage.replicas == "auto" or (isinstance(stage.replicas, int) and stage.replicas >= 1),
             f"stages.{name}.replicas must be 'auto' or an integer >= 1, got {stage.replicas!r}")
    _require(stage.dtype is None or stage.dtype in DTYPES,
             f"stages.{name}.dtype must be one of {', '.join(DTYPES)} (or null for the top-level dtype), got {stage.dtype!r}")


@dataclass
class StageConfig:
    """Resources and batching shared by every stage actor pool."""

    batch_size: int | str = "auto"
    """Images per forward pass (a prompt row with N candidates counts N); 'auto': the planner picks the size
    that amortises the per-batch overhead within the GPU's memory (`auto_batch` without GPU memory figures)."""
    num_gpus: float | str = "auto"
    """GPU fraction each actor holds (at most 1; 0 runs the stage on CPU); 'auto' lets the planner share GPUs
    by stage cost. Ignored without GPUs."""
    num_cpus: float | None = None
    """CPUs each actor holds; null: 1 on GPU clusters, a planned share on CPU-only clusters."""
    replicas: int | str = "auto"
    """Actors in the stage's pool; 'auto' lets the planner balance stages by cost."""
    dtype: str | None = None
    """fp32, fp16 or bf16; null uses the top-level `dtype`."""

    auto_batch: typing.ClassVar[int] = 8
    """What batch_size 'auto' means when the planner has no memory figures (CPU runs, unknown GPU)."""

    def __post_init__(self) -> None:
        _check_stage_common(self, self._name())

    def batch_images(self) -> int:
        """The configured batch size, with 'auto' read as the stage's fallback size."""
        return self.auto_batch if self.batch_size == "auto" else self.batch_size

    def _name(self) -> str:
        return getattr(self, "_stage_name", "<stage>")


def _diffusion_checks(stage: "StageConfig", name: str, has_guidance: bool) -> None:
    _require(isinstance(stage.steps, int) and stage.steps >= 1,
             f"stages.{name}.steps must be an integer >= 1, got {stage.steps!r}")
    if has_guidance:
        _require(isinstance(stage.guidance_scale, (int, float)) and stage.guidance_scale >= 0,
                 f"stages.{name}.guidance_scale must be a number >= 0, "
                 f"got {stage.guidance_scale!r}")


@dataclass
class TextEncoderStageConfig(StageConfig):
    """CLIP text encoder: tokenizes prompts and embeds them once per prompt."""

    _stage_name = "text_encoder"
    auto_batch = 64


@dataclass
class PriorStageConfig(StageConfig):
    """Diffusion prior: CLIP text embedding -> CLIP image embedding."""

    _stage_name = "prior"
    steps: int = 25
    """Sampling steps (Karlo default 25)."""
    guidance_scale: float = 4.0
    """Classifier-free guidance scale. As in UnCLIPPipeline, the prior and the decoder guide (each with its own
    scale) when either scale is > 1, and neither does when both are <= 1."""
    auto_batch = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        _diffusion_checks(self, "prior", has_guidance=True)


@dataclass
class DecoderStageConfig(StageConfig):
    """64px decoder: image embedding + text -> 64x64 image (learned variance, guidance)."""

    _stage_name = "decoder"
    steps: int = 25
    """Sampling steps (Karlo default 25)."""
    guidance_scale: float = 8.0
    """Classifier-free guidance scale; guidance is on for prior and decoder when either scale is > 1."""
    auto_batch = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        _diffusion_checks(self, "decoder", has_guidance=True)


@dataclass
class Upsampler256StageConfig(StageConfig):
    """Karlo super-resolution 64 -> 256 (super_res_first for all but the last step, super_res_last last)."""

    _stage_name = "upsampler_256"
    steps: int = 7
    """Sampling steps (Karlo default 7)."""
    auto_batch = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _diffusion_checks(self, "upsampler_256", has_guidance=False)


@dataclass
class Upsampler1024StageConfig(StageConfig):
    """x4 latent upscaler 256 -> 1024, continuing each candidate's generator."""

    _stage_name = "upsampler_1024"
    steps: int = 75
    """Sampling steps (StableDiffusionUpscalePipeline default 75)."""
    guidance_scale: float = 9.0
    """Classifier-free guidance scale (upscaler default 9)."""
    noise_level: int = 20
    """Noise added to the low-res input, 0..max_noise_level of the checkpoint (default 20)."""
    auto_batch = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _diffusion_checks(self, "upsampler_1024", has_guidance=True)
        _require(isinstance(self.noise_level, int) and self.noise_level >= 0,
                 f"stages.upsampler_1024.noise_level must be an integer >= 0, got {self.noise_level!r}")


@dataclass
class RerankerStageConfig(StageConfig):
    """CLIP reranker: scores every candidate of a prompt and keeps the best `rerank.keep`."""

    _stage_name = "reranker"
    auto_batch = 32


@dataclass
class ImageEncoderStageConfig(StageConfig):
    """CLIP image encoder of the image modes: fetches and decodes each row's image and embeds it once."""

    _stage_name = "image_encoder"
    auto_batch = 32


@dataclass
class StagesConfig:
    """Per-stage settings, keyed by stage name."""

    text_encoder: TextEncoderStageConfig = field(default_factory=TextEncoderStageConfig)
    prior: PriorStageConfig = field(default_factory=PriorStageConfig)
    decoder: DecoderStageConfig = field(default_factory=DecoderStageConfig)
    upsampler_256: Upsampler256StageConfig = field(default_factory=Upsampler256StageConfig)
    upsampler_1024: Upsampler1024StageConfig = field(default_factory=Upsampler1024StageConfig)
    reranker: RerankerStageConfig = field(default_factory=RerankerStageConfig)
    image_encoder: ImageEncoderStageConfig = field(default_factory=ImageEncoderStageConfig)


STAGE_NAMES = tuple(f.name for f in dataclasses.fields(StagesConfig))
"""Every stage a run can have, as the config spells them (stages.<name>)."""


@dataclass
class ModelsConfig:
    """Checkpoint sources: a Hugging Face Hub repo id (`org/name[@revision]`), a local directory, any fsspec URL, or
    a built-in `tiny://` checkpoint."""

    unclip: str | None = None
    """Karlo diffusers layout (kakaobrain/karlo-v1-alpha snapshot)."""
    upsampler_1024: str | None = None
    """x4 upscaler layout (stabilityai/stable-diffusion-x4-upscaler snapshot); null stops at 256px."""
    clip: str | None = None
    """CLIPModel layout (openai/clip-vit-large-patch14 snapshot) for reranking; null records no scores."""
    image_encoder: str | None = None
    """Image modes: a CLIPVisionModelWithProjection or CLIPModel snapshot with its preprocessor config (e.g.
    openai/clip-vit-large-patch14) to embed images; null: the `image_encoder/` and `feature_extractor/` of
    models.unclip (a kakaobrain/karlo-v1-alpha-image-variations snapshot)."""
    allow_pickle: bool = False
    """Load pickle (.bin/.ckpt) weights when a component has no safetensors. Only for checkpoints you trust."""

    def __post_init__(self) -> None:
        _require(isinstance(self.unclip, str) and self.unclip != "",
                 "models.unclip is required: a Karlo-layout checkpoint directory or URL (or use --preset tiny)")
        for key in ("upsampler_1024", "clip", "image_encoder"):
            value = getattr(self, key)
            _require(value is None or (isinstance(value, str) and value != ""),
                     f"models.{key} must be a checkpoint directory/URL or null, got {value!r}")
        _require(isinstance(self.allow_pickle, bool), f"models.allow_pickle must be true or false, got {self.allow_pickle!r}")


@dataclass
class RerankConfig:
    """CLIP reranking of each prompt's candidates."""

    candidates: int = 1
    """Images generated per prompt (N)."""
    keep: int = 1
    """Images kept per prompt (k <= N), the highest CLIP scores."""
    at: str = "decoder"
    """Where candidates are scored: 'decoder' (64px, only winners are upsampled) or 'upsampler_256'."""

    def __post_init__(self) -> None:
        _require(isinstance(self.candidates, int) and self.candidates >= 1,
                 f"rerank.candidates must be an integer >= 1, got {self.candidates!r}")
        _require(isinstance(self.keep, int) and 1 <= self.keep <= self.candidates,
                 f"rerank.keep must be an integer between 1 and rerank.candidates ({self.candidates}), got {self.keep!r}")
        _require(self.at in RERANK_AT, f"rerank.at must be one of {', '.join(RERANK_AT)}, got {self.at!r}")


def theta_max_problem(value, key: str = "textdiff.theta_max") -> str | None:
    """Why a theta_max value is unusable, or None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1:
        return None
    return f"{key} must be a number in (0, 1], got {value!r}"


def _check_frames(frames, key: str) -> None:
    _require(isinstance(frames, int) and not isinstance(frames, bool) and frames >= 2,
             f"{key} must be an integer >= 2 (images per row, from one end to the other), got {frames!r}")


@dataclass
class InterpolationConfig:
    """mode: interpolation, between the CLIP image embeddings of each row's image_a and image_b."""

    frames: int = 5
    """Images per row at theta = k / (frames - 1), k = 0..frames-1: frame 0 is image_a's variation, the last
    image_b's; every frame of a row decodes with the same seed. Also the most a row's own `frames` may ask for."""

    def __post_init__(self) -> None:
        _check_frames(self.frames, "interpolation.frames")


@dataclass
class TextdiffConfig:
    """mode: textdiff, moving each row's image embedding toward the change from its caption to target_prompt."""

    frames: int = 5
    """Images per row at theta = theta_max * k / (frames - 1); frame 0 is the image's variation. Also the most a
    row's own `frames` may ask for."""
    theta_max: float = 0.5
    """How far the last frame turns toward the text difference (0 < theta_max <= 1; 1 reaches it)."""

    def __post_init__(self) -> None:
        _check_frames(self.frames, "textdiff.frames")
        problem = theta_max_problem(self.theta_max)
        _require(problem is None, problem or "")


@dataclass
class PriorConfig:
    """Prior sampling options beyond the stage settings."""

    best_of: int = 1
    """Image embeddings sampled per candidate; the one with the highest dot product with the text embedding wins."""

    def __post_init__(self) -> None:
        _require(isinstance(self.best_of, int) and self.best_of >= 1,
                 f"prior.best_of must be an integer >= 1, got {self.best_of!r}")


@dataclass
class InputConfig:
    """Where prompts come from."""

    path: str | None = None
    """A Parquet file, directory or glob at any fsspec URL; may contain {window}."""
    prompt_column: str = "prompt"
    """Column holding the prompt text."""
    id_column: str | None = None
    """Column of unique row ids. Unset: the column `id` if the input has one, else ids derive from the file
    path and row position. Set: the input must have that column."""
    seed_column: str | None = None
    """Column of int64 per-row seeds. Unset: the column `seed` if the input has one, else seeds derive from
    the run seed and the id. Set: the input must have that column."""
    image_column: str = "image"
    """Image modes: the column holding each row's image, as encoded bytes or a path / fsspec URL to one."""
    limit: int | None = None
    """Only the first N rows (files in sorted order, rows in file order), to try a run before the whole input;
    ids and seeds are those the rows have in the whole input, so a later run without the limit resumes."""

    def __post_init__(self) -> None:
        _require(isinstance(self.path, str) and self.path != "",
                 "input.path is required: pass --input PATH (a Parquet file, directory or glob)")
        _require(self.limit is None or (isinstance(self.limit, int) and not isinstance(self.limit, bool)
                                        and self.limit >= 1),
                 f"input.limit must be a whole number of rows >= 1 (or unset for every row), got {self.limit!r}")
        for key in ("prompt_column", "id_column", "seed_column", "image_column"):
            value = getattr(self, key)
            _require((value is None and key != "prompt_column") or (isinstance(value, str) and value != ""),
                     f"input.{key} must be a column name, got {value!r}")

    @property
    def id_name(self) -> str:
        """The id column looked for: the one set, else `id`."""
        return self.id_column or DEFAULT_ID_COLUMN

    @property
    def seed_name(self) -> str:
        """The seed column looked for: the one set, else `seed`."""
        return self.seed_column or DEFAULT_SEED_COLUMN


@dataclass
class OutputConfig:
    """Where images and metadata go."""

    path: str | None = None
    """Output directory at any fsspec URL (a plain path is local); may contain {window}."""
    format: str = "files"
    """'files' (one image object per kept image) or 'webdataset' (tar shards of image + json)."""
    image_format: str = "png"
    """png, webp or jpeg (jpg is read as jpeg)."""
    quality: int = 95
    """Encoder quality for webp and jpeg (1-100); png is lossless and ignores it."""
    shard_size: int = 256
    """Rows per commit unit: one metadata part (and one tar shard for webdataset) each."""
    mode: str = "resume"
    """'resume' continues a run in the same output, 'overwrite' deletes it first, 'error_if_exists' refuses."""
    lease_s: float = 60.0
    """Seconds a driver's claim on the output lasts without renewal (renewed every third of it): a second
    driver on the same output refuses while the first lives, and takes over this long after it died."""
    save_embeddings: bool = False
    """Also store each kept image's CLIP image embedding (the prior's sample in text mode, the decoded, possibly
    interpolated one in the image modes) in the metadata column `image_embedding` (list<float32>)."""

    def __post_init__(self) -> None:
        _require(isinstance(self.path, str) and self.path != "",
                 "output.path is required: pass --output PATH (a directory or URL)")
        _require(self.format in OUTPUT_FORMATS, f"output.format must be one of {', '.join(OUTPUT_FORMATS)}, got {self.format!r}")
        if isinstance(self.image_format, str) and self.image_format.lower() in (*IMAGE_FORMATS, *IMAGE_FORMAT_ALIASES):
            self.image_format = IMAGE_FORMAT_ALIASES.get(self.image_format.lower(), self.image_format.lower())
        _require(self.image_format in IMAGE_FORMATS,
                 f"output.image_format must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}")
        _require(isinstance(self.quality, int) and 1 <= self.quality <= 100,
                 f"output.quality must be an integer 1-100, got {self.quality!r}")
        _require(isinstance(self.shard_size, int) and self.shard_size >= 1,
                 f"output.shard_size must be an integer >= 1, got {self.shard_size!r}")
        _require(self.mode in OUTPUT_MODES, f"output.mode must be one of {', '.join(OUTPUT_MODES)}, got {self.mode!r}")
        _require(isinstance(self.lease_s, (int, float)) and not isinstance(self.lease_s, bool) and self.lease_s >= 1,
                 f"output.lease_s must be a number of seconds >= 1, got {self.lease_s!r}")
        _require(isinstance(self.save_embeddings, bool),
                 f"output.save_embeddings must be true or false, got {self.save_embeddings!r}")


@dataclass
class RunConfig:
    """The cluster a run plans for, naming of scheduled runs, progress."""

    gpus: int | str = "auto"
    """GPUs the run plans for and reserves: 'auto' = what the autoscaler can scale to when the cluster has one,
    else the GPUs the cluster has now; a number asks for exactly that many (0: CPU only)."""
    gpu_wait_s: float = 900.0
    """How long to wait for the planned GPUs (autoscaler start-up included) before failing."""
    gpu_kind: str = "auto"
    """GPU model for memory and speed figures (t4, a10g, l4, a100-40gb, a100-80gb, h100-80gb); 'auto' reads
    the GPU's memory on the cluster."""

    window: str | None = None
    """The run's window (e.g. a date); substituted for {window} in input.path and output.path. 'auto': now."""
    window_granularity: str = "day"
    """For window 'auto': 'day' (YYYY-MM-DD) or 'hour' (YYYY-MM-DDTHH) in UTC."""
    progress_interval_s: float = 30.0
    """Seconds between progress lines (one per stage) when stderr is not a terminal."""
    verbose: bool = False
    """Also show Ray's and the model libraries' own output (weight-loading bars, Ray Data's execution notes);
    off, a run prints its own lines and the warnings that matter."""
    fuse_stages: bool = False
    """Run all the stages a GPU hosts in one actor (one process and CUDA context per GPU, nothing handed between
    stages through the object store) instead of one actor per stage; stages then take turns on each batch
    instead of overlapping. Needs a plan where every GPU hosts every stage (co-located), or no GPUs."""

    def __post_init__(self) -> None:
        _require(isinstance(self.verbose, bool), f"run.verbose must be true or false, got {self.verbose!r}")
        _require(isinstance(self.fuse_stages, bool), f"run.fuse_stages must be true or false, got {self.fuse_stages!r}")
        _require(self.gpus == "auto" or (isinstance(self.gpus, int) and not isinstance(self.gpus, bool)
                                         and self.gpus >= 0),
                 f"run.gpus must be 'auto' or a number of GPUs >= 0, got {self.gpus!r}")
        _require(isinstance(self.gpu_wait_s, (int, float)) and self.gpu_wait_s >= 0,
                 f"run.gpu_wait_s must be a number of seconds >= 0, got {self.gpu_wait_s!r}")
        _require(self.gpu_kind == "auto" or self.gpu_kind in GPU_KINDS,
                 f"run.gpu_kind must be 'auto' or one of {', '.join(GPU_KINDS)}, got {self.gpu_kind!r}")
        _require(self.window is None or isinstance(self.window, (str, date)),
                 f"run.window must be a date such as 2026-11-24 or 'auto', got {self.window!r}")
        _require(self.window_granularity in window.FORMATS,
                 f"run.window_granularity must be 'day' or 'hour', got {self.window_granularity!r}")
        _require(isinstance(self.progress_interval_s, (int, float)) and self.progress_interval_s > 0,
                 f"run.progress_interval_s must be a number of seconds > 0, got {self.progress_interval_s!r}")
        try:
            self.window = window.resolve(self.window, self.window_granularity)
        except window.WindowError as exc:
            raise ConfigError(str(exc)) from None


@dataclass
class Config:
    """One generation run."""

    models: ModelsConfig
    input: InputConfig
    output: OutputConfig
    preset: str | None = None
    """'tiny' fills unset model sources with tiny seeded checkpoints built in code."""
    mode: str = "text"
    """What the images are decoded from: `text` (prompts, through the prior), `variation` (the CLIP image
    embedding of each row's image), `interpolation` (between two images' embeddings) or `textdiff` (an image's
    embedding turned toward a caption change)."""
    stages: StagesConfig = field(default_factory=StagesConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    interpolation: InterpolationConfig = field(default_factory=InterpolationConfig)
    textdiff: TextdiffConfig = field(default_factory=TextdiffConfig)
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 0
    """Run seed; rows without a seed column derive their seeds from it and their id."""
    dtype: str = "auto"
    """Default stage dtype: fp32, fp16, bf16, or auto (fp16 on GPU, fp32 on CPU)."""
    storage_options: dict = field(default_factory=dict)
    """fsspec storage options for every remote URL (e.g. endpoint_url, key, secret, anon). Never logged."""

    def __post_init__(self) -> None:
        _require(isinstance(self.seed, int) and 0 <= self.seed < 2**63,
                 f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        _require(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _require(self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        _require(isinstance(self.storage_options, dict), "storage_options must be a mapping of fsspec options")
        try:  # scheduled runs: both paths are templated by the resolved window
            self.input.path = window.fill(self.input.path, "input.path", self.run.window)
            self.output.path = window.fill(self.output.path, "output.path", self.run.window)
        except window.WindowError as exc:
            raise ConfigError(str(exc)) from None
        _require(self.rerank.candidates == self.rerank.keep or self.mode in ("text", "variation"),
                 f"{self.mode} keeps every frame of every candidate; set rerank.keep to rerank.candidates "
                 f"({self.rerank.candidates})")
        _require(self.rerank.candidates == self.rerank.keep or self.models.clip is not None,
                 f"rerank.candidates={self.rerank.candidates} > rerank.keep={self.rerank.keep} needs models.clip "
                 "(a CLIPModel checkpoint) to score candidates")

    @property
    def image_mode(self) -> bool:
        """Images are decoded from the CLIP embeddings of input images, not from prompts."""
        return self.mode in IMAGE_MODES

    @property
    def frames(self) -> int:
        """Images per candidate trajectory: the frames of interpolation and textdiff, else 1."""
        return {"interpolation": self.interpolation.frames, "textdiff": self.textdiff.frames}.get(self.mode, 1)

    @property
    def source_image_columns(self) -> tuple[str, ...]:
        """The input columns holding each row's source images (bytes or paths / URLs): image_a and image_b for
        interpolation, input.image_column in the other image modes, none in text mode."""
        if not self.image_mode:
            return ()
        return INTERPOLATION_COLUMNS if self.mode == "interpolation" else (self.input.image_column,)

    @property
    def images_per_row(self) -> int:
        """Images each row decodes: rerank.candidates trajectories of `frames` images."""
        return self.rerank.candidates * self.frames

    @property
    def reranks(self) -> bool:
        """Candidates are scored by CLIP: text and variation runs with models.clip (interpolation and textdiff
        keep every frame)."""
        return self.models.clip is not None and self.mode in ("text", "variation")

    @property
    def image_encoder_source(self) -> str:
        """The model source key the image modes' encoder comes from: models.image_encoder when set, else the
        image-variations parts of models.unclip."""
        return "image_encoder" if self.models.image_encoder is not None else "unclip"

    def model_layouts(self) -> dict[str, str]:
        """Each model source that is set, mapped to the checkpoint layout this run reads from it: the text mode
        needs the Karlo prior, the image modes an image encoder (inside models.unclip unless given apart)."""
        unclip = "unclip"
        if self.image_mode:
            unclip = "unclip_decoding" if self.models.image_encoder is not None else "unclip_image"
        layouts = {"unclip": unclip, "upsampler_1024": "upsampler_1024", "clip": "clip"}
        if self.image_mode:
            layouts["image_encoder"] = "image_encoder"
        return {key: layout for key, layout in layouts.items() if getattr(self.models, key) is not None}


# ---------------------------------------------------------------- presets

PRESETS: dict[str, dict] = {
    # Tiny random checkpoints, built and saved in code: for demos, tests and CI.
    "tiny": {
        "models": {"unclip": "tiny://unclip", "upsampler_1024": "tiny://upsampler_1024", "clip": "tiny://clip"},
        "stages": {"upsampler_1024": {"steps": 20}},
    },
    # The real models from the Hugging Face Hub, each pinned to a commit (fp16 on GPUs, as dtype 'auto' does).
    # The image modes take the image encoder from CLIP ViT-L/14 itself: it is the encoder of
    # kakaobrain/karlo-v1-alpha-image-variations, whose main branch ships pickle weights only, while the rest of
    # that snapshot is Karlo's own decoder and super-resolution.
    "karlo": {
        "models": {
            "unclip": "kakaobrain/karlo-v1-alpha@5ee45298e0956749e621bcb30c799a0b599afa83",
            "upsampler_1024": "stabilityai/stable-diffusion-x4-upscaler@c1d3e4830bb80da091d1d94354d8852fab670b4b",
            "clip": "openai/clip-vit-large-patch14@32bd64288804d66eefd0ccbe215aa642df71cc41",
            "image_encoder": "openai/clip-vit-large-patch14@32bd64288804d66eefd0ccbe215aa642df71cc41",
        },
    },
}


# ---------------------------------------------------------------- building from dicts


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts (mappings such as storage_options count as leaves)."""
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys.extend(valid_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_key(dotted: str) -> ConfigError:
    close = difflib.get_close_matches(dotted, valid_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see README for the valid keys"
    return ConfigError(f"unknown config key '{dotted}'{hint}")


def _leaf_key(dotted: str, value: Any) -> str:
    # Report the key as the user wrote it: 'stages.priors.steps', not just 'stages.priors'.
    while isinstance(value, dict) and len(value) == 1:
        key, value = next(iter(value.items()))
        dotted = f"{dotted}.{key}"
    return dotted


def _build(cls: type, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {data!r}")
    types = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types:
            raise _unknown_key(_leaf_key(f"{prefix}{key}", value))
        tp = types[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    for name, tp in types.items():
        if name not in kwargs and dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, {}, f"{prefix}{name}.")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, dotted: str) -> Any:
    # YAML gives ints for "4"; float fields accept them. Everything else is checked by __post_init__.
    if tp in (float, "float") and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if float in args and isinstance(value, int) and not isinstance(value, bool) and int not in args:
            return float(value)
    if tp is dict and value is None:
        return {}
    return value


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if any(p == "" for p in parts):
        raise ConfigError(f"malformed key '{dotted}': expected dotted.key=value")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "storage_options":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', YAML scalar of value)."""
    if "=" not in text:
        raise ConfigError(f"--set expects dotted.key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What the YAML parser objected to and where, as 'line L, column C: problem'."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def load_config(
    path: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    input_path: str | None = None,
    output_path: str | None = None,
    preset: str | None = None,
    window: str | None = None,
) -> Config:
    """Build a validated Config: preset < YAML file < --set overrides < --input/--output/--preset/--window."""
    tree: dict = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                loaded = yaml.safe_load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
        tree = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    for key, value in (("input.path", input_path), ("output.path", output_path), ("preset", preset),
                       ("run.window", window)):
        if value is not None:
            _set_dotted(tree, key, value)
    preset_name = tree.get("preset")
    if preset_name is not None:
        if preset_name not in PRESETS:
            raise ConfigError(f"unknown preset '{preset_name}'; available: {', '.join(PRESETS)}")
        tree = _merge(PRESETS[preset_name], tree)
    for section in ("models", "input", "output"):
        tree.setdefault(section, {})
    return _build(Config, tree)


def to_dict(config: Config) -> dict:
    """Plain nested dict of a config (what the run records)."""
    return dataclasses.asdict(config)


SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session")


def redacted(config: Config) -> dict:
    """The config as a dict with storage credentials masked: safe for logs, metadata and the summary."""
    data = to_dict(config)
    data["storage_options"] = redact_options(data.get("storage_options", {}))
    return data


def redact_options(options: dict) -> dict:
    out = {}
    for key, value in options.items():
        if isinstance(value, dict):
            out[key] = redact_options(value)
        elif any(word in key.lower() for word in SECRET_WORDS):
            out[key] = "***"
        else:
            out[key] = value
    return out


def stage_config(config: Config, name: str) -> StageConfig:
    return getattr(config.stages, name)


FP32_STAGES = ("reranker",)
"""Stages that compute in fp32 whatever the run's dtype: CLIP scores in fp16 move in steps of 0.016-0.03, so
close candidates would swap places between GPU models."""


def compute_dtype(config: Config, name: str, device_type: str) -> str:
    """The dtype a stage computes in on a device type ('cuda' or 'cpu'): fp32, fp16 or bf16."""
    if name in FP32_STAGES:
        return "fp32"
    chosen = stage_config(config, name).dtype or config.dtype
    if chosen == "auto":
        return "fp16" if device_type == "cuda" else "fp32"
    return chosen
