"""The output directory as run state: modes, the recorded config, committed rows, cleanup, and the summary."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import Config, to_dict
from pipeline.writer import METADATA_DIR, SINKS

RUN_FILE = "_run.json"
SUCCESS_FILE = "_SUCCESS.json"

# Settings that change only speed or placement: a run may resume with different values.
RESUME_NEUTRAL = ("batch_size", "num_gpus", "num_cpus", "replicas", "storage_options", "output.mode",
                  "output.shard_size", "output.path", "input.path", "run.")


class OutputError(ValueError):
    """The output path cannot be used as asked (exists with error_if_exists, or holds a different run)."""


@dataclass
class ResumeState:
    done_ids: set[str] = field(default_factory=set)
    committed_shards: set[str] = field(default_factory=set)
    finished: dict | None = None
    """The summary of a run that already finished here, if any."""


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "storage_options":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_identity(config: Config) -> dict[str, object]:
    """The settings that determine the outputs; two runs may share an output only if these agree."""
    return {k: v for k, v in _flatten(to_dict(config)).items()
            if not any(k == n or k.endswith("." + n) or k.startswith(n) for n in RESUME_NEUTRAL)}


def differing_keys(recorded: dict, current: dict) -> list[str]:
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))


class OutputDir:
    """One run's output location."""

    def __init__(self, config: Config):
        self.config = config
        self.fs, self.root = storage.filesystem(config.output.path, config.storage_options)

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def read_json(self, name: str) -> dict | None:
        path = self.path(name)
        if not storage.exists(self.fs, path):
            return None
        return json.loads(storage.read_bytes(self.fs, path))

    def write_json(self, name: str, data: dict) -> None:
        self.write_bytes(name, json.dumps(data, indent=2, sort_keys=True, default=str).encode())

    def write_bytes(self, name: str, data: bytes) -> None:
        storage.atomic_write(self.fs, self.path(name), data)

    def is_empty(self) -> bool:
        return not storage.listdir(self.fs, self.root)

    def check(self) -> dict | None:
        """The read-only part of `prepare`, safe before any resource is held: refuses an output the run may
        not use, and returns the summary of a run that already finished here (None otherwise)."""
        mode = self.config.output.mode
        url = self.config.output.path
        if mode == "error_if_exists" and not self.is_empty():
            raise OutputError(f"output {url} already has content and output.mode=error_if_exists; "
                              "choose another output path or set output.mode=resume or overwrite")
        if mode == "overwrite":
            return None
        recorded = self.read_json(RUN_FILE)
        if recorded is not None:
            differ = differing_keys(recorded.get("identity", {}), run_identity(self.config))
            if differ:
                raise OutputError(f"output {url} holds a run with different settings ({', '.join(differ)}); "
                                  "rerun with the recorded settings, use another output path, or set "
                                  "output.mode=overwrite")
        return self.read_json(SUCCESS_FILE)

    def prepare(self) -> ResumeState:
        """Apply output.mode, check the recorded run matches, and load what earlier attempts committed."""
        state = ResumeState(finished=self.check())
        if state.finished is not None:
            return state
        if self.config.output.mode == "overwrite" and not self.is_empty():
            url = self.config.output.path
            storage.with_retries(lambda: self.fs.rm(self.root, recursive=True), what=f"delete {url}")
        recorded = self.read_json(RUN_FILE)
        identity = run_identity(self.config)
        if recorded is None:
            self.write_json(RUN_FILE, {"identity": identity})
        self._remove_in_progress()
        table = self.metadata(columns=["id", "shard"])
        if table is not None:
            state.done_ids = set(table.column("id").to_pylist())
            state.committed_shards = set(table.column("shard").to_pylist())
        SINKS[self.config.output.format].cleanup(self.fs, self.root, state.committed_shards)
        return state

    def _remove_in_progress(self) -> None:
        # Temporary files of writers killed mid-write; hidden, but not worth keeping.
        for folder in storage.listdir(self.fs, self.root):
            for path in storage.listdir(self.fs, folder) if self.fs.isdir(folder) else []:
                if ".inprogress-" in path.rsplit("/", 1)[-1]:
                    self.fs.rm(path)

    def metadata(self, columns: list[str] | None = None):
        """All committed metadata rows (or None before the first commit)."""
        folder = self.path(METADATA_DIR)
        parts = [p for p in storage.listdir(self.fs, folder)
                 if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(".")]
        if not parts:
            return None
        return storage.with_retries(
            lambda: pq.read_table(parts, filesystem=storage.pyarrow_filesystem(self.fs), columns=columns),
            what=f"read {folder}")
