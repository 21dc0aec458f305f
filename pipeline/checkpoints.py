"""Checkpoint sources: layouts, preflight validation, per-node local caching, and `from_pretrained` loading."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

from pipeline import storage
from pipeline.presets import TINY_BUILDERS, TINY_VERSION

DIFFUSERS_MODEL = "diffusers model"
TRANSFORMERS_MODEL = "transformers model"
SCHEDULER = "scheduler"
TOKENIZER = "tokenizer"
IMAGE_PROCESSOR = "image processor"

TINY_SCHEME = "tiny://"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or malformed; the message names the path and the part."""


@dataclass(frozen=True)
class Component:
    subfolder: str
    """Folder inside the checkpoint ('' for the root)."""
    kind: str
    cls: str | None
    """Dotted class to load with; None: the class named in the component's own config (schedulers)."""


@dataclass(frozen=True)
class Layout:
    description: str
    components: dict[str, Component]


_DECODING = {
    "tokenizer": Component("tokenizer", TOKENIZER, "transformers.CLIPTokenizer"),
    "text_encoder": Component("text_encoder", TRANSFORMERS_MODEL, "transformers.CLIPTextModelWithProjection"),
    "text_proj": Component("text_proj", DIFFUSERS_MODEL,
                           "diffusers.pipelines.deprecated.unclip.text_proj.UnCLIPTextProjModel"),
    "decoder": Component("decoder", DIFFUSERS_MODEL, "diffusers.UNet2DConditionModel"),
    "super_res_first": Component("super_res_first", DIFFUSERS_MODEL, "diffusers.UNet2DModel"),
    "super_res_last": Component("super_res_last", DIFFUSERS_MODEL, "diffusers.UNet2DModel"),
    "decoder_scheduler": Component("decoder_scheduler", SCHEDULER, "diffusers.UnCLIPScheduler"),
    "super_res_scheduler": Component("super_res_scheduler", SCHEDULER, "diffusers.UnCLIPScheduler"),
}
"""What every mode decodes with: Karlo's text encoder (its '' encoding conditions the image modes), text
projection, decoder and 256px super-resolution pair."""
UNCLIP = Layout("Karlo unCLIP diffusers layout", {
    **_DECODING,
    "prior": Component("prior", DIFFUSERS_MODEL, "diffusers.PriorTransformer"),
    "prior_scheduler": Component("prior_scheduler", SCHEDULER, "diffusers.UnCLIPScheduler"),
})


def _image_encoder_parts(in_subfolders: bool) -> dict[str, Component]:
    """The CLIP image encoder and its preprocessing: in their own folders (a Karlo image-variations snapshot) or
    at the root (a CLIPVisionModelWithProjection or CLIPModel snapshot)."""
    return {"image_encoder": Component("image_encoder" if in_subfolders else "", TRANSFORMERS_MODEL,
                                       "transformers.CLIPVisionModelWithProjection"),
            "feature_extractor": Component("feature_extractor" if in_subfolders else "", IMAGE_PROCESSOR,
                                           "transformers.AutoImageProcessor")}


UNCLIP_IMAGE = Layout("Karlo image-variations diffusers layout", {**_DECODING, **_image_encoder_parts(True)})
UNCLIP_DECODING = Layout("Karlo unCLIP diffusers layout (decoder part)", _DECODING)
IMAGE_ENCODER = Layout("CLIP image encoder layout (CLIPVisionModelWithProjection or CLIPModel)",
                       _image_encoder_parts(False))

UPSCALER = Layout("x4 upscaler diffusers layout", {
    "vae": Component("vae", DIFFUSERS_MODEL, "diffusers.AutoencoderKL"),
    "text_encoder": Component("text_encoder", TRANSFORMERS_MODEL, "transformers.CLIPTextModel"),
    "tokenizer": Component("tokenizer", TOKENIZER, "transformers.CLIPTokenizer"),
    "unet": Component("unet", DIFFUSERS_MODEL, "diffusers.UNet2DConditionModel"),
    "scheduler": Component("scheduler", SCHEDULER, None),
    "low_res_scheduler": Component("low_res_scheduler", SCHEDULER, None),
})

CLIP = Layout("CLIPModel layout", {
    "model": Component("", TRANSFORMERS_MODEL, "transformers.CLIPModel"),
    "tokenizer": Component("", TOKENIZER, "transformers.CLIPTokenizer"),
    "image_processor": Component("", IMAGE_PROCESSOR, "transformers.AutoImageProcessor"),
})

LAYOUTS = {"unclip": UNCLIP, "unclip_image": UNCLIP_IMAGE, "unclip_decoding": UNCLIP_DECODING,
           "upsampler_1024": UPSCALER, "clip": CLIP, "image_encoder": IMAGE_ENCODER}

_WEIGHT_STEMS = {DIFFUSERS_MODEL: ("diffusion_pytorch_model", "diffusion_pytorch_model"),
                 TRANSFORMERS_MODEL: ("model", "pytorch_model")}
_CONFIG_FILE = {DIFFUSERS_MODEL: "config.json", TRANSFORMERS_MODEL: "config.json", SCHEDULER: "scheduler_config.json"}
_OPTIONAL_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _weight_files(names: set[str], stem: str, suffix: str) -> list[str]:
    single = f"{stem}.{suffix}"
    if single in names:
        return [single]
    index = f"{stem}.{suffix}.index.json"
    if index in names:
        shard = re.compile(rf"^{re.escape(stem)}-\d+-of-\d+\.{suffix}$")
        return [index] + sorted(n for n in names if shard.match(n))
    return []


def select_files(where: str, component: Component, names: set[str], allow_pickle: bool) -> list[str]:
    """The files a component needs out of those present; raises CheckpointError naming what is missing."""
    kind = component.kind
    if kind in (DIFFUSERS_MODEL, TRANSFORMERS_MODEL):
        if "config.json" not in names:
            raise CheckpointError(f"{where}: missing config.json")
        safe_stem, pickle_stem = _WEIGHT_STEMS[kind]
        weights = _weight_files(names, safe_stem, "safetensors")
        if not weights:
            pickled = _weight_files(names, pickle_stem, "bin")
            if pickled and not allow_pickle:
                raise CheckpointError(
                    f"{where}: only pickle weights ({pickled[0]}); convert them to safetensors, or set "
                    "models.allow_pickle=true if you trust this checkpoint")
            if not pickled:
                raise CheckpointError(f"{where}: missing {safe_stem}.safetensors (model weights)")
            weights = pickled
        return ["config.json"] + weights
    if kind == SCHEDULER:
        if "scheduler_config.json" not in names:
            raise CheckpointError(f"{where}: missing scheduler_config.json")
        return ["scheduler_config.json"]
    if kind == TOKENIZER:
        optional = [n for n in _OPTIONAL_TOKENIZER_FILES if n in names]
        base = [n for n in ("tokenizer.json", "vocab.json", "merges.txt") if n in names]
        if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
            raise CheckpointError(f"{where}: missing tokenizer files (tokenizer.json, or vocab.json + merges.txt)")
        return base + optional
    if kind == IMAGE_PROCESSOR:
        found = [n for n in ("preprocessor_config.json", "processor_config.json") if n in names]
        if not found:
            raise CheckpointError(f"{where}: missing preprocessor_config.json (the image preprocessing config)")
        return found
    raise AssertionError(kind)


def _where(url: str, layout: Layout, component: Component) -> str:
    inside = f"/{component.subfolder}" if component.subfolder else ""
    return f"checkpoint {url.rstrip('/')}{inside} ({layout.description})"


VERSION_FIELDS = ("ETag", "etag", "md5Hash", "crc32c", "checksum", "generation", "VersionId", "version_id",
                  "LastModified", "last_modified", "updated", "mtime", "created")
"""What fsspec listings say about a file's version (S3, GCS, Azure, local, memory): a changed file changes one."""


def _listing(fs, folder: str, url: str) -> dict[str, dict]:
    """Name -> fsspec details of every entry directly in folder; empty when it does not exist."""

    def ls() -> list:
        try:
            return fs.ls(folder, detail=True)
        except FileNotFoundError:
            return []

    fs.invalidate_cache(folder)
    try:
        entries = storage.with_retries(ls, what=f"list {url}")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {url} cannot be listed: {type(exc).__name__}: {exc}") from None
    return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry for entry in entries}


def _check_json(url: str, layout: Layout, component: Component, name: str, raw: bytes) -> None:
    try:
        json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{_where(url, layout, component)}: {name} is not valid JSON ({exc})") from None


def _is_config(name: str) -> bool:
    return name.endswith("config.json") and name != "tokenizer_config.json"


def _plan_files(url: str, layout: Layout, storage_options: dict, allow_pickle: bool,
                read_configs: bool = True) -> dict[str, tuple[Component, dict]]:
    """Every file the layout needs, relative path -> (component, the storage's details of it), after checking
    they exist and (with read_configs) that their configs parse."""
    fs, root = storage.filesystem(url, storage_options)
    try:
        is_dir = storage.with_retries(lambda: fs.isdir(root), what=f"stat {url}")
    except Exception as exc:  # noqa: BLE001 - every backend's error (credentials, endpoint, ...) is one line
        raise CheckpointError(f"checkpoint {storage.failure(url, exc)}") from None
    if not is_dir:
        raise CheckpointError(f"checkpoint {url} does not exist or is not a directory ({layout.description})")
    listed: dict[str, dict[str, dict]] = {}
    wanted: dict[str, tuple[Component, dict]] = {}
    for component in layout.components.values():
        sub = component.subfolder
        if sub not in listed:
            listed[sub] = _listing(fs, storage.join(root, sub) if sub else root, url)
            if not listed[sub]:
                raise CheckpointError(f"{_where(url, layout, component)}: folder {sub}/ is missing")
        for name in select_files(_where(url, layout, component), component, set(listed[sub]), allow_pickle):
            rel = f"{sub}/{name}" if sub else name
            if rel in wanted:
                continue
            wanted[rel] = (component, listed[sub][name])
            if read_configs and _is_config(name):
                _check_json(url, layout, component, name, storage.read_bytes(fs, storage.join(root, rel)))
    return wanted


def _manifest_of(files: dict[str, tuple[Component, dict]]) -> list[dict]:
    """Each file the loader reads, with its size and version as the storage lists it."""
    return [{"path": rel, "size": details.get("size"),
             **{key: details[key] for key in VERSION_FIELDS if details.get(key) is not None}}
            for rel, (_, details) in sorted(files.items())]


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+(@[A-Za-z0-9_./-]+)?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
TRUE_WORDS = ("1", "true", "yes", "on")
_COMMIT_SNAPSHOTS: dict[tuple, str] = {}
"""Local snapshot folders of Hub commits this process already resolved: a commit never changes, so checking
it once is enough (a branch or tag is asked again each time)."""


def hub_repo(source: str) -> tuple[str, str] | None:
    """(repo id, revision) when `source` names a Hugging Face Hub repo, `org/name` or `org/name@revision`, and
    not a URL or a path that exists (as diffusers' from_pretrained decides); None otherwise."""
    if "://" in source or os.path.exists(source) or not HUB_ID.match(source):
        return None
    repo, _, revision = source.partition("@")
    return repo, revision or "main"


def _hub_patterns(layout: Layout, allow_pickle: bool) -> list[str]:
    """The files the loader reads, as Hub download patterns: configs, tokenizer and processor files, weights."""
    suffixes = ("json", "txt", "safetensors") + (("bin",) if allow_pickle else ())
    folders = sorted({c.subfolder for c in layout.components.values()})
    return ["model_index.json"] + [f"{folder}/*.{suffix}" if folder else f"*.{suffix}"
                                   for folder in folders for suffix in suffixes]


def hub_snapshot(source: str, layout_name: str, allow_pickle: bool = False) -> str:
    """This node's local copy of a Hub repo (fetched once into the Hugging Face cache, which HF_HOME or
    HF_HUB_CACHE place; HF_TOKEN for private repos; with HF_HUB_OFFLINE only the cache is used)."""
    from huggingface_hub import snapshot_download

    repo, revision = hub_repo(source)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE_WORDS
    cache = os.environ.get("HF_HUB_CACHE") or None  # read now, not when huggingface_hub was imported
    patterns = _hub_patterns(LAYOUTS[layout_name], allow_pickle)
    key = (repo, revision, cache, tuple(patterns))
    if key in _COMMIT_SNAPSHOTS:
        return _COMMIT_SNAPSHOTS[key]
    try:
        path = snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=offline,
                                 allow_patterns=patterns, token=os.environ.get("HF_TOKEN") or None)
    except Exception as exc:  # noqa: BLE001 - the Hub client raises many types; each is one line here
        if offline:
            raise CheckpointError(f"checkpoint {source}: Hugging Face Hub repo {repo} at revision {revision} is not "
                                  f"in the local Hub cache{f' ({cache})' if cache else ''} and HF_HUB_OFFLINE is set; "
                                  "fetch it once with network access, or unset HF_HUB_OFFLINE") from None
        detail = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise CheckpointError(f"checkpoint {source}: the Hugging Face Hub repo cannot be fetched "
                              f"({type(exc).__name__}: {detail}); check the repo id, the revision and HF_TOKEN") from None
    if COMMIT.match(revision):
        _COMMIT_SNAPSHOTS[key] = path
    return path


def pin_revision(source: str, layout_name: str, allow_pickle: bool = False) -> str:
    """A Hub source pinned to the commit its revision names now (`org/name@<commit hash>`), so every actor loads
    the same files and the run's recorded settings change when the repo does; other sources as they are."""
    hub = hub_repo(source)
    if hub is None:
        return source
    commit = os.path.basename(os.path.normpath(hub_snapshot(source, layout_name, allow_pickle)))
    return f"{hub[0]}@{commit}"


def validate(url: str, layout_name: str, storage_options: dict | None = None, allow_pickle: bool = False) -> None:
    """Check a source before any work starts: exists, every component present, configs parse."""
    if hub_repo(url) is not None:
        _plan_files(hub_snapshot(url, layout_name, allow_pickle), LAYOUTS[layout_name], {}, allow_pickle)
        return
    if url.startswith(TINY_SCHEME):
        name = url[len(TINY_SCHEME):]
        if name not in TINY_BUILDERS:
            raise CheckpointError(f"unknown built-in checkpoint {url}; available: "
                                  + ", ".join(TINY_SCHEME + n for n in TINY_BUILDERS))
        return
    _plan_files(url, LAYOUTS[layout_name], storage_options or {}, allow_pickle)


def cache_root() -> str:
    return os.environ.get("UNCLIP_RAY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unclip_ray")


@contextlib.contextmanager
def _node_lock(path: str):
    # An flock serializes the actors of one node that start together; other nodes have their own cache.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_once(target: str, fill) -> str:
    marker = os.path.join(target, ".complete")
    if os.path.exists(marker):
        return target
    with _node_lock(target):
        if os.path.exists(marker):
            return target
        staging = f"{target}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        fill(staging)
        open(os.path.join(staging, ".complete"), "w").close()
        shutil.rmtree(target, ignore_errors=True)
        os.rename(staging, target)
    return target


def local_dir(url: str, layout_name: str, storage_options: dict | None = None, allow_pickle: bool = False) -> str:
    """A local directory holding the checkpoint: the path itself, or this node's cached copy or build.

    A remote checkpoint's copy is keyed by its content as the storage lists it (each file's path, size, ETag,
    mtime or checksum), so one republished at the same URL is copied anew and an unchanged one is not.
    """
    if url.startswith(TINY_SCHEME):
        name = url[len(TINY_SCHEME):]
        validate(url, layout_name)
        target = os.path.join(cache_root(), f"tiny-v{TINY_VERSION}", name)
        return _build_once(target, TINY_BUILDERS[name])
    if hub_repo(url) is not None:
        path = hub_snapshot(url, layout_name, allow_pickle)
        validate(path, layout_name, allow_pickle=allow_pickle)
        return path
    if storage.is_local(url):
        path = url[len("file://"):] if url.startswith("file://") else url
        validate(path, layout_name, allow_pickle=allow_pickle)
        return os.path.abspath(path)
    options = storage_options or {}
    layout = LAYOUTS[layout_name]
    planned = _plan_files(url, layout, options, allow_pickle, read_configs=False)
    files = _manifest_of(planned)
    key = json.dumps({"url": url.rstrip("/"), "layout": layout_name, "pickle": allow_pickle, "files": files},
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    target = os.path.join(cache_root(), "models", f"{url.rstrip('/').rsplit('/', 1)[-1]}-{digest}")

    def copy(staging: str) -> None:
        fs, root = storage.filesystem(url, options)
        for entry in files:
            rel = entry["path"]
            local = os.path.join(staging, rel)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            storage.with_retries(lambda rel=rel, local=local: fs.get_file(storage.join(root, rel), local),
                                 what=f"download {url}/{rel}")
            if entry["size"] is not None and os.path.getsize(local) != entry["size"]:
                raise CheckpointError(f"checkpoint {url} changed while it was copied ({rel}); rerun once it is "
                                      "published completely")
            if _is_config(os.path.basename(rel)):
                with open(local, "rb") as fh:
                    _check_json(url, layout, planned[rel][0], os.path.basename(rel), fh.read())
        with open(os.path.join(staging, ".manifest.json"), "w", encoding="utf-8") as fh:
            fh.write(key)

    return _build_once(target, copy)


DEFAULT_MAX_NOISE_LEVEL = 350
"""The x4 upscaler's highest noise_level when its model_index.json names none (diffusers' default)."""


def max_noise_level(url: str, storage_options: dict | None = None) -> int:
    """The highest noise_level an x4 upscaler checkpoint takes: max_noise_level in its model_index.json."""
    if url.startswith(TINY_SCHEME) or hub_repo(url) is not None:
        url = local_dir(url, "upsampler_1024")
    fs, root = storage.filesystem(url, storage_options)
    try:
        raw = storage.read_bytes(fs, storage.join(root, "model_index.json"))
    except FileNotFoundError:
        return DEFAULT_MAX_NOISE_LEVEL
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {url}: model_index.json cannot be read: "
                              f"{type(exc).__name__}: {exc}") from None
    try:
        value = json.loads(raw).get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL)
    except (ValueError, AttributeError):
        raise CheckpointError(f"checkpoint {url}: model_index.json is not a valid JSON object") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"checkpoint {url}: max_noise_level in model_index.json must be an integer, "
                              f"got {value!r}")
    return value


def check_noise_level(url: str, noise_level: int, storage_options: dict | None = None) -> None:
    """Refuse a 1024px upsampler noise_level above what the checkpoint was trained for."""
    most = max_noise_level(url, storage_options)
    if noise_level > most:
        raise CheckpointError(f"stages.upsampler_1024.noise_level={noise_level} is above the maximum {most} of "
                              f"checkpoint {url} (max_noise_level in its model_index.json); set "
                              f"stages.upsampler_1024.noise_level to at most {most}")


def _import(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _scheduler_class(path: str, component: Component) -> Any:
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    if component.cls is not None:
        return _import(component.cls)
    config_path = os.path.join(path, component.subfolder, "scheduler_config.json")
    with open(config_path, encoding="utf-8") as fh:
        name = json.load(fh).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise CheckpointError(f"{config_path}: _class_name {name!r} is not a diffusers scheduler")
    return cls


def load(path: str, layout_name: str, name: str, *, torch_dtype=None, device=None, allow_pickle: bool = False):
    """Load one component of a local checkpoint with its class's own `from_pretrained`."""
    component = LAYOUTS[layout_name].components[name]
    kwargs: dict[str, Any] = {"subfolder": component.subfolder} if component.subfolder else {}
    if component.kind == SCHEDULER:
        return _scheduler_class(path, component).from_pretrained(path, **kwargs)
    cls = _import(component.cls)
    if component.kind in (TOKENIZER, IMAGE_PROCESSOR):
        return cls.from_pretrained(path, local_files_only=True, **kwargs)
    # Safetensors only, unless the user opted in; pickle can execute code on load.
    model = cls.from_pretrained(path, torch_dtype=torch_dtype, use_safetensors=None if allow_pickle else True,
                                local_files_only=True, **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()
