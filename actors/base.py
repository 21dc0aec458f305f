"""Shared machinery of stage actors: device and dtype, error-row pass-through, micro-batching, generator travel."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from pipeline import checkpoints, progress, seeds
from pipeline.config import Config, compute_dtype
from pipeline.counters import BEGIN_PREFIX, END_PREFIX, IMAGES_PREFIX, OOM_PREFIX, SECONDS_PREFIX

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GENERATOR_STATE = "generator_state"
FINAL_IMAGE = "image"


class StageLoadError(RuntimeError):
    """A stage actor could not load its model: the run stops (retrying would fail the same way)."""


@dataclass
class StageContext:
    """What the planner tells one stage's actors beyond the run config."""

    config: Config
    use_gpu: bool = False
    """The actor holds GPUs; it computes on CUDA when torch sees one."""
    num_threads: int = 1
    """torch intra-op threads when computing on CPU."""
    final_image: bool = False
    """This stage produces the run's final images: it returns float [0, 1] NCHW pixels as `image`, which the
    base class checks for NaN/inf and then emits as uint8 HWC."""
    options: dict = field(default_factory=dict)
    """Stage-specific wiring (e.g. which column the reranker scores)."""
    progress_board: str | None = None
    """Name of the run's progress actor (pipeline.progress); None: report metrics only."""
    batch_images: int | None = None
    """Images per forward pass as planned; None: the stage's configured size."""
    memory_fraction: float | None = None
    """Share of its GPU's memory this actor may allocate (the plan's figure); None: no cap."""


def to_uint8_hwc(images01: torch.Tensor) -> np.ndarray:
    """[0,1] NCHW -> uint8 NHWC, rounding exactly as diffusers' numpy_to_pil does."""
    array = images01.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).numpy()
    return (array * 255).round().astype(np.uint8)


class StageActor:
    """One pipeline stage. Ray Data instantiates it once per actor and calls it on batches of rows.

    A batch is a dict of numpy arrays, one entry per row. Rows whose `status` is not 'ok' pass through
    untouched (their outputs are zeros). Columns in `candidate_inputs` have a leading candidate axis per
    row; the actor flattens rows x candidates into images and runs forward passes of at most
    `stages.<name>.batch_size` images, so results do not depend on how Ray Data cut the batch.
    """

    name: ClassVar[str]
    row_inputs: ClassVar[tuple[str, ...]] = ()
    """Per-row columns, repeated for each candidate of the row."""
    candidate_inputs: ClassVar[tuple[str, ...]] = ()
    """Per-candidate columns, shape (rows, candidates, ...)."""
    drops: ClassVar[tuple[str, ...]] = ()
    """Columns no later stage needs; removed from the batch after this stage."""
    per_row: ClassVar[bool] = False
    """Outputs have no candidate axis (the text encoder)."""
    uses_generators: ClassVar[bool] = False
    """Continue each candidate's generator from `generator_state` (or start it from `seeds`)."""

    def __init__(self, context: StageContext):
        progress.enlist(context.progress_board, self.name)  # first: the run can end it even if loading fails
        self.context = context
        self.config = context.config
        self.settings = getattr(self.config.stages, self.name)
        use_cuda = context.use_gpu and torch.cuda.is_available()
        if context.use_gpu and not use_cuda and os.path.exists("/dev/nvidiactl"):
            # Given a real GPU that torch cannot use: fail the run rather than compute ~100x slower on the CPU.
            raise StageLoadError(f"stage {self.name} on node {socket.gethostname()}: torch {torch.__version__} "
                                 f"(CUDA {torch.version.cuda}) cannot use the GPU Ray assigned; install a torch build "
                                 "for this node's driver")
        self.device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, context.num_threads))
        elif context.memory_fraction is not None:
            # Actors sharing a GPU each keep to their planned share, so one cannot starve the others.
            torch.cuda.set_per_process_memory_fraction(context.memory_fraction, self.device)
        self.batch_images = context.batch_images or self.settings.batch_images()
        self.oom_halvings = 0
        """Times a forward pass ran out of GPU memory and was retried as two halves."""
        self.dtype = DTYPES[compute_dtype(self.config, self.name, self.device.type)]
        self.output_spec: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        """Per-image (or per-row) shape and dtype of each output; filled by load()."""
        try:
            self.load()
        except Exception as exc:  # noqa: BLE001 - any load failure is reported the same way
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StageLoadError(f"stage {self.name} could not load its model: {detail}") from exc
        self.reporter = progress.StageReporter(self.name, context.progress_board)
        if self.uses_generators:
            self.output_spec[GENERATOR_STATE] = ((seeds.GENERATOR_STATE_BYTES,), np.dtype(np.uint8))

    # ------------------------------------------------------------ to implement

    def load(self) -> None:
        raise NotImplementedError

    def run(self, inputs: dict[str, np.ndarray], generators: list[torch.Generator] | None) -> dict[str, np.ndarray]:
        """Pure step on a flat chunk of images (or rows for per_row stages); returns per-image outputs."""
        raise NotImplementedError

    # ------------------------------------------------------------ helpers for subclasses

    def checkpoint(self, source_key: str) -> str:
        """This node's local copy of the model source `models.<source_key>`, in the layout this run reads."""
        models = self.config.models
        return checkpoints.local_dir(getattr(models, source_key), self.config.model_layouts()[source_key],
                                     self.config.storage_options, models.allow_pickle)

    def load_component(self, path: str, source_key: str, component: str):
        try:
            return checkpoints.load(path, self.config.model_layouts()[source_key], component, torch_dtype=self.dtype,
                                    device=self.device, allow_pickle=self.config.models.allow_pickle)
        except Exception as exc:
            # Name the checkpoint as the user gave it: some loaders' errors name no file at all. (The stage's
            # load error keeps the first line.)
            raise RuntimeError(f"{component} of models.{source_key}={getattr(self.config.models, source_key)}: "
                               f"{str(exc) or type(exc).__name__}") from exc

    def tensor(self, array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, dtype or self.dtype)

    # ------------------------------------------------------------ batch mapping

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        status = np.asarray(batch["status"]).astype(object)
        ok = np.nonzero(status == "ok")[0]
        rows = len(status)
        out = {k: v for k, v in batch.items() if k not in self.drops}
        candidates = self._candidates(batch)
        computed, failures = ({}, {})
        halvings_before = self.oom_halvings
        began = time.time()
        started = time.perf_counter()
        if len(ok):
            computed, failures = self._process({k: batch[k][ok] for k in self.row_inputs + self.candidate_inputs
                                                if k in batch}, candidates)
        busy = time.perf_counter() - started
        images = np.zeros(rows, dtype=np.int64)
        images[ok] = candidates
        out[IMAGES_PREFIX + self.name] = images
        out[SECONDS_PREFIX + self.name] = busy * images / max(1, int(images.sum()))
        out[BEGIN_PREFIX + self.name] = np.full(rows, began)
        out[END_PREFIX + self.name] = np.full(rows, began + busy)
        halvings = np.zeros(rows, dtype=np.int64)
        halvings[0] = self.oom_halvings - halvings_before  # summed later, so one row carries the batch's count
        out[OOM_PREFIX + self.name] = halvings
        for column, (shape, dtype) in self.output_spec.items():
            lead = (rows,) if self.per_row else (rows, candidates)
            full = np.zeros(lead + shape, dtype=dtype)
            if len(ok):
                full[ok] = computed[column]
            out[column] = full
        if failures:
            status = status.copy()
            errors = np.asarray(batch["error"]).astype(object).copy()
            for position, reason in failures.items():
                status[ok[position]] = "error"
                errors[ok[position]] = reason
            out["status"], out["error"] = status, errors
        self.reporter.record(rows=rows, images=int(images.sum()), errors=len(failures), seconds=busy)
        return out

    def _candidates(self, batch: dict[str, np.ndarray]) -> int:
        if self.per_row:
            return 1
        return int(np.asarray(batch[self.candidate_inputs[0]]).shape[1])

    def _process(self, rows: dict[str, np.ndarray], candidates: int):
        n_rows = len(next(iter(rows.values())))
        per = 1 if self.per_row else candidates
        flat = {}
        for key, value in rows.items():
            value = np.asarray(value)
            if key in self.candidate_inputs:
                flat[key] = value.reshape((n_rows * per,) + value.shape[2:])
            else:
                flat[key] = np.repeat(value, per, axis=0) if per > 1 else value
        total = n_rows * per
        chunks = []
        start = 0
        while start < total:
            size = min(self.batch_images, total - start)
            chunks.extend(self._run_chunk({k: v[start:start + size] for k, v in flat.items()}))
            start += size
        merged = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        failures = self._non_finite_rows(merged, n_rows, per)
        if self.context.final_image:
            # Converted only after the check: cast to uint8, a NaN image would pass as a black one. The rows
            # that failed are error rows, so zeroing their non-finite values only keeps the cast defined.
            finite = np.nan_to_num(merged[FINAL_IMAGE], nan=0.0, posinf=1.0, neginf=0.0)
            merged[FINAL_IMAGE] = to_uint8_hwc(torch.from_numpy(finite))
        shaped = {k: (v if self.per_row else v.reshape((n_rows, per) + v.shape[1:])) for k, v in merged.items()}
        return shaped, failures

    def _run_chunk(self, chunk: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """One forward pass; out of GPU memory, the same images as two halves (each image's result does not
        depend on its batch), and later passes of this actor stay at the smaller size."""
        images = len(next(iter(chunk.values())))
        generators = self._generators(chunk) if self.uses_generators else None
        try:
            with torch.inference_mode():
                result = self.run(chunk, generators)
        except torch.OutOfMemoryError:
            if images == 1:
                raise
            result = None  # retried below, outside the handler, so the failed pass's tensors are freed first
        if result is None:
            half = (images + 1) // 2
            self.oom_halvings += 1
            self.batch_images = min(self.batch_images, half)
            log.warning("%s: out of GPU memory at %d images per pass; retrying as %d + %d", self.name, images,
                        half, images - half)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return (self._run_chunk({k: v[:half] for k, v in chunk.items()})
                    + self._run_chunk({k: v[half:] for k, v in chunk.items()}))
        if generators is not None:
            result[GENERATOR_STATE] = np.stack([seeds.generator_state(g) for g in generators])
        return [result]

    def _generators(self, chunk: dict[str, np.ndarray]) -> list[torch.Generator]:
        # CPU generators on any device: the same seed gives the same draws on every GPU model.
        if GENERATOR_STATE in chunk:
            return [seeds.restore_generator(state) for state in chunk[GENERATOR_STATE]]
        return [seeds.new_generator(seed) for seed in chunk["seeds"]]

    def _non_finite_rows(self, merged: dict[str, np.ndarray], n_rows: int, per: int) -> dict[int, str]:
        failures: dict[int, str] = {}
        for column, values in merged.items():
            if not np.issubdtype(values.dtype, np.floating):
                continue
            bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
            for image in np.nonzero(bad)[0]:
                failures.setdefault(int(image) // per, f"{self.name} produced non-finite values in {column}")
        if failures:
            log.warning("%s: %d row(s) produced NaN/inf and are recorded as errors", self.name, len(failures))
        return failures
