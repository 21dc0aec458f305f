"""Prompt input: preflight checks of the Parquet source, then a streaming Ray Data read that yields prompt rows."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import images, rowids, seeds, storage
from pipeline.config import FRAMES_COLUMN, IMAGE_EMBEDDING_COLUMN, TARGET_PROMPT_COLUMN, THETA_MAX_COLUMN, Config

GLOB_CHARS = re.compile(r"[*?\[]")


class InputError(ValueError):
    """A run-level input problem (missing column, unreadable path, duplicate ids); one line for the user."""


@dataclass
class InputInfo:
    """What preflight learned about the input."""

    url: str
    files: list[str]
    """Paths inside the filesystem (no protocol), in a stable order."""
    rows: int
    has_id: bool
    has_seed: bool
    has_prompt: bool = True
    """The input has the prompt column (optional in the image modes, where it is only a caption to rerank by)."""
    image_columns: list[str] = field(default_factory=list)
    """Image modes: the image and image-embedding columns the input has."""
    fingerprint: str = ""
    """A hash of every file's path, size and row count: a finished run counts as finished for this input only."""
    row_limits: dict[str, int] = field(default_factory=dict)
    """Files read only in part (input.limit): path -> how many rows from its start."""
    groups: list[list[str]] = field(default_factory=list)
    """Files grouped by the types of the columns read: each group is read as one schema, then unioned,
    so a file whose prompt column is not a string yields error rows instead of breaking the read."""


def _resolve_files(url: str, storage_options: dict) -> tuple[object, list[str]]:
    fs, path = storage.filesystem(url, storage_options)
    expected = "expected a Parquet file, a directory of Parquet files, or a glob"
    try:
        if GLOB_CHARS.search(path):
            files = [p for p in storage.with_retries(lambda: fs.glob(path), what=f"glob {url}")
                     if not storage.with_retries(lambda p=p: fs.isdir(p), what=f"stat {p}")]
        elif storage.with_retries(lambda: fs.isdir(path), what=f"stat {url}"):
            files = [p for p in storage.with_retries(lambda: fs.find(path), what=f"list {url}")
                     if p.endswith(".parquet") and not _hidden(p[len(path.rstrip('/')) + 1:])]
        elif storage.with_retries(lambda: fs.isfile(path), what=f"stat {url}"):
            files = [path]
        else:
            raise InputError(f"input.path {url} does not exist ({expected})")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any backend error is a run-level 'unreadable path'
        raise InputError(f"input.path {storage.failure(url, exc)}") from None
    if not files:
        raise InputError(f"input.path {url} matches no Parquet files ({expected})")
    return fs, sorted(files)


def _hidden(relative: str) -> bool:
    # Same convention as pyarrow/Spark: _SUCCESS, .inprogress files and _temporary dirs are not data.
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def preflight(config: Config) -> InputInfo:
    """Check the input before any model loads: readable files, the prompt column, id uniqueness, seed type."""
    spec = config.input
    fs, files = _resolve_files(spec.path, config.storage_options)
    rows = 0
    has_id = has_seed = has_prompt = image_columns = None
    groups: dict[tuple, list[str]] = {}
    fingerprint = hashlib.sha256()
    row_limits: dict[str, int] = {}
    limited = False
    for index, path in enumerate(files):
        if spec.limit is not None and rows >= spec.limit:
            files, limited = files[:index], True  # the files after the limit are not read at all
            break
        try:
            with fs.open(path, "rb") as fh:
                parquet = pq.ParquetFile(fh)
                schema, count = parquet.schema_arrow, parquet.metadata.num_rows
                size = getattr(fh, "size", None) or fs.size(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt files
            raise InputError(f"input file {path} is not a readable Parquet file ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
        names = schema.names
        if spec.prompt_column not in names and not config.image_mode:
            raise InputError(f"input file {path} has no column '{spec.prompt_column}' (columns: "
                             f"{', '.join(names) or 'none'}); set input.prompt_column to the prompt column")
        file_images = _image_columns(config, path, schema) if config.image_mode else []
        if image_columns is not None and file_images != image_columns:
            raise InputError(f"input file {path} differs from the others in its image columns "
                             f"({', '.join(file_images) or 'none'} vs {', '.join(image_columns) or 'none'})")
        image_columns = file_images
        file_has_prompt = spec.prompt_column in names
        if has_prompt is not None and file_has_prompt != has_prompt:
            raise InputError(f"input file {path} differs from the others in having a '{spec.prompt_column}' "
                             "column; every file needs the same columns")
        has_prompt = file_has_prompt
        for key, column in (("id_column", spec.id_column), ("seed_column", spec.seed_column)):
            if column is not None and column not in names:  # named on purpose: never silently derived instead
                raise InputError(f"input file {path} has no column '{column}' set as input.{key} (columns: "
                                 f"{', '.join(names)}); name an existing column, or unset input.{key} to derive it")
        read = [c for c in (spec.prompt_column, spec.id_name, spec.seed_name, *file_images) if c in names]
        groups.setdefault(tuple(str(schema.field(c).type) for c in read), []).append(path)
        file_has_id, file_has_seed = spec.id_name in names, spec.seed_name in names
        if has_id is not None and (file_has_id != has_id or file_has_seed != has_seed):
            raise InputError(f"input file {path} differs from the others in having '{spec.id_name}' or "
                             f"'{spec.seed_name}' columns; every file needs the same optional columns")
        has_id, has_seed = file_has_id, file_has_seed
        if file_has_seed and not pa.types.is_integer(schema.field(spec.seed_name).type):
            raise InputError(f"input column '{spec.seed_name}' in {path} is {schema.field(spec.seed_name).type}, "
                             "expected int64 seeds (or rename it and set input.seed_column)")
        fingerprint.update(f"{path}\t{size}\t{count}\n".encode())
        if spec.limit is not None and rows + count > spec.limit:
            row_limits[path], count, limited = spec.limit - rows, spec.limit - rows, True
        rows += count
    if limited:  # a limited run is finished only for its limit: a later run without it goes on
        fingerprint.update(f"limit\t{spec.limit}\n".encode())
    info = InputInfo(url=spec.path, files=files, rows=rows, has_id=bool(has_id), has_seed=bool(has_seed),
                     has_prompt=bool(has_prompt), image_columns=image_columns or [],
                     fingerprint=fingerprint.hexdigest(), row_limits=row_limits, groups=list(groups.values()))
    if config.reranks and not info.has_prompt and config.rerank.keep < config.rerank.candidates:
        raise InputError(f"rerank.keep={config.rerank.keep} < rerank.candidates={config.rerank.candidates}, but the "
                         f"input has no '{spec.prompt_column}' column to rerank {config.mode} candidates by; add "
                         "captions, or set rerank.keep to rerank.candidates to keep every candidate")
    if info.has_id:
        _check_unique_ids(fs, files, spec.id_name)
    return info


def _image_columns(config: Config, path: str, schema: pa.Schema) -> list[str]:
    """The mode's own columns in one file of an image-mode input (images, embeddings, target prompts), checked."""
    spec, names, mode = config.input, schema.names, config.mode

    def missing(column: str, what: str) -> InputError:
        return InputError(f"input file {path} has no column '{column}' (columns: {', '.join(names)}); {mode} mode "
                          f"needs {what}")

    if mode == "interpolation":
        found = list(config.source_image_columns)
        for column in found:
            if column not in names:
                raise missing(column, "each row's two images in 'image_a' and 'image_b', as bytes or paths / URLs")
    elif mode == "textdiff":
        found = [spec.image_column, TARGET_PROMPT_COLUMN]
        if spec.image_column not in names:
            raise missing(spec.image_column, "each row's image as bytes or a path / URL (set input.image_column)")
        if TARGET_PROMPT_COLUMN not in names:
            raise missing(TARGET_PROMPT_COLUMN, "the caption each image moves toward in 'target_prompt'")
        if not (pa.types.is_string(schema.field(TARGET_PROMPT_COLUMN).type)
                or pa.types.is_large_string(schema.field(TARGET_PROMPT_COLUMN).type)):
            raise InputError(f"input column '{TARGET_PROMPT_COLUMN}' in {path} is "
                             f"{schema.field(TARGET_PROMPT_COLUMN).type}, expected strings")
        if THETA_MAX_COLUMN in names:
            kind = schema.field(THETA_MAX_COLUMN).type
            if not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
                raise InputError(f"input column '{THETA_MAX_COLUMN}' in {path} is {kind}, expected numbers in "
                                 "(0, 1] (null: textdiff.theta_max)")
            found.append(THETA_MAX_COLUMN)
    else:
        found = [c for c in (spec.image_column, IMAGE_EMBEDDING_COLUMN) if c in names]
        if not found:
            raise missing(spec.image_column, "each row's image as bytes or a path / URL (set input.image_column), "
                                             f"or its CLIP embedding in '{IMAGE_EMBEDDING_COLUMN}'")
    if mode != "variation" and FRAMES_COLUMN in names:
        if not pa.types.is_integer(schema.field(FRAMES_COLUMN).type):
            raise InputError(f"input column '{FRAMES_COLUMN}' in {path} is {schema.field(FRAMES_COLUMN).type}, "
                             f"expected integers from 2 to {mode}.frames (null: {mode}.frames)")
        found.append(FRAMES_COLUMN)
    for column in found:
        kind = schema.field(column).type
        if column == IMAGE_EMBEDDING_COLUMN:
            if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) \
                    or not (pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)):
                raise InputError(f"input column '{column}' in {path} is {kind}, expected a list of floats (a raw "
                                 "CLIP image embedding)")
        elif column in config.source_image_columns and not (
                pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_string(kind)
                or pa.types.is_large_string(kind)):
            raise InputError(f"input column '{column}' in {path} is {kind}, expected encoded image bytes (binary) "
                             "or paths / URLs (string)")
    return found


def _check_unique_ids(fs, files: list[str], column: str) -> None:
    # One streaming pass over the id column as 16-byte digests, in bounded memory (rowids.RepeatedDigests).
    def values():
        for path in files:
            with fs.open(path, "rb") as fh:
                for batch in pq.ParquetFile(fh).iter_batches(columns=[column], batch_size=65536):
                    yield path, [str(v) for v in batch.column(0).to_pylist() if v is not None]

    finder = rowids.RepeatedDigests()
    for _, ids in values():
        finder.add(rowids.digests(ids))
    twice = finder.repeated()
    if not len(twice):
        return
    wanted, seen = set(twice.tolist()), set()
    for path, ids in values():  # a second pass only to name the first repeated id and where it repeats
        for key in ids:
            d = rowids.digest(key)
            if d in wanted:
                if d in seen:
                    raise InputError(f"duplicate id '{key}' in input column '{column}' (found again in {path}); "
                                     "ids must be unique: fix the input or drop the id column to derive ids")
                seen.add(d)


def derived_id(path: str, row_hash: int) -> str:
    """Id of a row without one: file stem + Ray Data's row hash of (file path, row position)."""
    stem = os.path.basename(path)
    stem = stem[: -len(".parquet")] if stem.endswith(".parquet") else stem
    return f"{stem}-{int(row_hash):016x}"


def validate_prompt(value) -> str | None:
    """The reason a prompt value cannot be generated from, or None when it is fine."""
    if value is None:
        return "prompt is null"
    if not isinstance(value, str):
        return f"prompt is {type(value).__name__}, expected a string"
    if value.strip() == "":
        return "prompt is empty" if value == "" else "prompt is whitespace only"
    return None


class RowPreparer:
    """Turns raw Parquet rows (an Arrow table) into pipeline rows: id, prompt, status, error, truncated, seeds,
    and the row's own seed for the metadata of error rows (row_seed, row_seed_known)."""

    def __init__(self, config: Config, info: InputInfo, done_ids=None):
        self.spec = config.input
        self.run_seed = config.seed
        self.candidates = config.rerank.candidates
        self.has_id, self.has_seed = info.has_id, info.has_seed
        self.has_prompt, self.image_columns = info.has_prompt, info.image_columns
        self.image_mode = config.image_mode
        self.source_image_columns = config.source_image_columns
        self.done_ids = done_ids
        self.row_limits = info.row_limits

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        # Arrow values as Python objects: exact ints and None. Numpy conversion would turn an int64 column
        # holding a null into float64, rounding seeds above 2^53 and writing integer ids as "12.0".
        n = table.num_rows
        prompts = table.column(self.spec.prompt_column).to_pylist() if self.has_prompt else [""] * n
        raw_ids = table.column(self.spec.id_name).to_pylist() if self.has_id else [None] * n
        raw_seeds = table.column(self.spec.seed_name).to_pylist() if self.has_seed else [None] * n
        ids = np.empty(n, dtype=object)
        for i, raw in enumerate(raw_ids):
            ids[i] = str(raw) if raw is not None and not _is_nan(raw) else self._derived_id(table, i)
        status = np.full(n, "ok", dtype=object)
        errors = np.full(n, "", dtype=object)
        seed_matrix = np.zeros((n, self.candidates), dtype=np.int64)
        row_seed = np.zeros(n, dtype=np.int64)
        row_seed_known = np.zeros(n, dtype=bool)
        clean_prompts = np.empty(n, dtype=object)
        for i, value in enumerate(prompts):
            # In the image modes a prompt is only a caption (to rerank by); a missing one is the empty caption.
            reason = None if self.image_mode else validate_prompt(value)
            clean_prompts[i] = value if isinstance(value, str) else ("" if value is None else str(value))
            base, seed_problem = self._base_seed(raw_seeds[i], ids[i])
            if seed_problem is None:
                seed_matrix[i] = seeds.candidate_seeds(base, self.candidates)
            # A rejected seed is still recorded as given, when int64 can hold it.
            row_seed_known[i] = -(2**63) <= base < 2**63
            row_seed[i] = base if row_seed_known[i] else 0
            reason = reason or seed_problem
            if reason:
                status[i], errors[i] = "error", reason
        done = self._done_ids()
        keep = ~done.contains(ids) if done else np.ones(n, dtype=bool)
        if self.row_limits:
            keep &= self._within_limit(table)
        return {
            "id": ids[keep], "prompt": clean_prompts[keep], "status": status[keep], "error": errors[keep],
            "truncated": np.zeros(int(keep.sum()), dtype=bool), "seeds": seed_matrix[keep],
            "row_seed": row_seed[keep], "row_seed_known": row_seed_known[keep],
            **self._image_values(table, keep),
        }

    def _image_values(self, table: pa.Table, keep: np.ndarray) -> dict[str, np.ndarray]:
        """The image-mode columns of the kept rows; each source image column as images.carried makes it."""
        values = {}
        for column in self.image_columns:
            raw = table.column(column).to_pylist()
            if column in self.source_image_columns:
                data, kinds = images.carried(raw)
                values[column], values[images.kind_column(column)] = data[keep], kinds[keep]
            else:
                values[column] = _objects(raw)[keep]
        return values

    def _done_ids(self) -> rowids.IdSet | None:
        """The ids earlier attempts committed: given directly, or as a Ray object (fetched once per process,
        zero-copy from the node's object store, so millions of ids are not shipped with every task)."""
        if self.done_ids is None or isinstance(self.done_ids, rowids.IdSet):
            return self.done_ids
        key = self.done_ids.hex()
        if key not in _FETCHED_DONE_IDS:
            import ray

            _FETCHED_DONE_IDS.clear()  # one run's set at a time
            _FETCHED_DONE_IDS[key] = ray.get(self.done_ids)
        return _FETCHED_DONE_IDS[key]

    def _within_limit(self, table: pa.Table) -> np.ndarray:
        """Which rows lie within input.limit. A read task sees a block of some file, not row positions, so a
        row is placed by its row hash, which Ray Data computes from the file path and the row's position."""
        paths = np.asarray(table.column("path").to_pylist(), dtype=object)
        hashes = table.column("row_hash").to_numpy(zero_copy_only=False)
        keep = np.ones(table.num_rows, dtype=bool)
        for path, first in self.row_limits.items():
            in_file = paths == path
            if in_file.any():
                keep[in_file] = np.isin(hashes[in_file], _first_row_hashes(path, first))
        return keep

    @staticmethod
    def _derived_id(table: pa.Table, i: int) -> str:
        return derived_id(table.column("path")[i].as_py(), table.column("row_hash")[i].as_py())

    def _base_seed(self, raw, row_id: str) -> tuple[int, str | None]:
        """(the row's base seed, or its rejected input value; why it was rejected, or None)."""
        if raw is None:
            return seeds.derived_base_seed(self.run_seed, row_id), None
        value = int(raw)
        if not 0 <= value < seeds.SEED_LIMIT:
            return value, f"seed {value} is out of range; expected 0 <= seed < 2^63"
        return value, None


_FETCHED_DONE_IDS: dict[str, rowids.IdSet] = {}


def _first_row_hashes(path: str, rows: int) -> np.ndarray:
    """The row hashes Ray Data gives the first `rows` rows of a Parquet file it reads whole."""
    from ray.data._internal.datasource_v2.common.synthesized_columns import _compute_row_hashes

    return _compute_row_hashes(path, 0, rows)


def _objects(values: list) -> np.ndarray:
    """A 1-D object array of Python values (lists stay lists, not a 2-D array)."""
    array = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        array[i] = value
    return array


def _is_nan(value) -> bool:
    return isinstance(value, float) and value != value


def read_prompts(config: Config, info: InputInfo, *, done_ids=None, num_cpus: float | None = None,
                 runtime_env: dict | None = None):
    """A streaming Ray Dataset of pipeline rows; rows whose id is in done_ids (an IdSet, or a Ray reference to
    one) are dropped."""
    import ray
    import ray.data

    fs, _ = storage.filesystem(info.url, config.storage_options)
    columns = [config.input.prompt_column] if info.has_prompt else []
    columns += info.image_columns
    if info.has_id:
        columns.append(config.input.id_name)
    if info.has_seed:
        columns.append(config.input.seed_name)
    if isinstance(done_ids, rowids.IdSet):  # shipped once through the object store, not with every task
        done_ids = ray.put(done_ids) if done_ids else None
    preparer = RowPreparer(config, info, done_ids)
    # Ray Data's default (V2) Parquet reader lists the files through a pool of footer-reading actors (32) that it
    # starts and kills for every read: a burst of worker processes and seconds of start-up to read a few prompt
    # files' footers (a 3-row file: about 3 s, against 0.1 s). The V1 reader reads footers in its own tasks and
    # gives the same rows, paths and row hashes, so ids derived from them do not change.
    context = ray.data.DataContext.get_current()
    use_v2, context.use_datasource_v2 = context.use_datasource_v2, False
    datasets = []
    try:
        for files in info.groups:
            dataset = ray.data.read_parquet(
                files, filesystem=storage.pyarrow_filesystem(fs), columns=columns, include_paths=True,
                include_row_hash=True, num_cpus=num_cpus, partitioning=None, runtime_env=runtime_env,
            )
            # A callable instance (not a class) runs as tasks, fused with the read.
            datasets.append(dataset.map_batches(preparer, batch_format="pyarrow", num_cpus=num_cpus,
                                                runtime_env=runtime_env))
    finally:
        context.use_datasource_v2 = use_v2
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
