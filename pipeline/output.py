"""The output directory as run state: modes, the recorded config, the lease, committed parts, cleanup, the summary."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import Config, to_dict
from pipeline.lease import LEASE_FILE, LeaseError, OutputLease
from pipeline.rowids import IdSet, digests
from pipeline.writer import METADATA_DIR, SINKS, part_attempt

RUN_FILE = "_run.json"
SUCCESS_FILE = "_SUCCESS.json"
ATTEMPT_FILE = "_attempt.json"
"""The live attempt and the metadata parts it accepted from earlier attempts: a part counts as committed only
if it is listed there or was written by the live attempt, so a dead attempt's late commit never counts."""
LEASE_SETTLE_S = 2.0

# Settings that change only speed or placement: a run may resume with different values.
RESUME_NEUTRAL = ("batch_size", "num_gpus", "num_cpus", "replicas", "storage_options", "output.mode",
                  "output.shard_size", "output.lease_s", "output.path", "input.path", "run.")
RESOLVED_PREFIX = "resolved."
"""Identity keys known only once the plan is made: each stage's device type and the dtype it computes in."""


class OutputError(ValueError):
    """The output path cannot be used as asked (exists with error_if_exists, or holds a different run)."""


@dataclass
class ResumeState:
    done_ids: IdSet = field(default_factory=IdSet)
    """Ids of rows committed by earlier attempts."""
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


def run_identity(config: Config, resolved: dict[str, str] | None = None) -> dict[str, object]:
    """The settings that determine the outputs; two runs may share an output only if these agree.

    `resolved` adds what only the plan knows: per stage, the device type and dtype it computes in (e.g.
    'cuda fp16'), since the same settings give other pixels in fp16 than in fp32."""
    identity = {k: v for k, v in _flatten(to_dict(config)).items()
                if not any(k == n or k.endswith("." + n) or k.startswith(n) for n in RESUME_NEUTRAL)}
    identity.update({RESOLVED_PREFIX + stage: value for stage, value in (resolved or {}).items()})
    return identity


def differing_keys(recorded: dict, current: dict) -> list[str]:
    if not any(k.startswith(RESOLVED_PREFIX) for k in recorded) or not any(
            k.startswith(RESOLVED_PREFIX) for k in current):
        # Compared once both sides know them: before planning, and against runs that did not record them.
        recorded = {k: v for k, v in recorded.items() if not k.startswith(RESOLVED_PREFIX)}
        current = {k: v for k, v in current.items() if not k.startswith(RESOLVED_PREFIX)}
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))


def part_name(path: str) -> str:
    """A metadata part's shard name: its file name without .parquet."""
    return path.rstrip("/").rsplit("/", 1)[-1][: -len(".parquet")]


class OutputDir:
    """One run's output location."""

    def __init__(self, config: Config):
        self.config = config
        self.fs, self.root = storage.filesystem(config.output.path, config.storage_options)
        self.lease: OutputLease | None = None

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

    def _entries(self) -> list[str]:
        """What is under the output, less this product's lease (present while a run holds the output)."""
        return [p for p in storage.listdir(self.fs, self.root) if p.rstrip("/").rsplit("/", 1)[-1] != LEASE_FILE]

    def is_empty(self) -> bool:
        return not self._entries()

    def check(self, resolved: dict[str, str] | None = None) -> dict | None:
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
            differ = differing_keys(recorded.get("identity", {}), run_identity(self.config, resolved))
            if differ:
                raise OutputError(f"output {url} holds a run with different settings ({', '.join(differ)}); "
                                  "rerun with the recorded settings, use another output path, or set "
                                  "output.mode=overwrite")
        return self.read_json(SUCCESS_FILE)

    def acquire(self) -> str:
        """Claim the output for this driver (see pipeline.lease); returns the attempt id. Raises LeaseError."""
        ttl = float(self.config.output.lease_s)
        self.lease = OutputLease(self.fs, self.root, self.config.output.path, ttl_s=ttl,
                                 settle_s=min(LEASE_SETTLE_S, ttl / 4))
        try:
            self.lease.acquire()
        except LeaseError:
            self.lease = None
            raise
        return self.lease.attempt

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def lost_lease(self) -> str | None:
        return self.lease.lost if self.lease is not None else None

    def prepare(self, resolved: dict[str, str] | None = None) -> ResumeState:
        """With the lease held: apply output.mode, check the recorded run matches, record this attempt, and
        load what earlier attempts committed."""
        if self.lease is None:
            raise RuntimeError("prepare() needs the output lease: call acquire() first")
        state = ResumeState(finished=self.check(resolved))
        if state.finished is not None:
            return state
        if self.config.output.mode == "overwrite":
            for entry in self._entries():
                storage.with_retries(lambda entry=entry: self.fs.rm(entry, recursive=True), what=f"delete {entry}")
        recorded = self.read_json(RUN_FILE)
        identity = run_identity(self.config, resolved)
        if recorded is None or set(identity) - set(recorded.get("identity", {})):
            self.write_json(RUN_FILE, {"identity": identity})  # first attempt, or one that now knows more
        self._remove_in_progress()
        earlier = self.committed_parts(remove_others=True)
        self.write_json(ATTEMPT_FILE, {"attempt": self.lease.attempt, "accepted": sorted(map(part_name, earlier))})
        state.committed_shards = {part_name(p) for p in earlier}
        state.done_ids = IdSet.from_chunks(
            digests(batch.column(0).to_pylist()) for batch in self.iter_metadata(["id"], earlier))
        SINKS[self.config.output.format].cleanup(self.fs, self.root, state.committed_shards)
        return state

    def _remove_in_progress(self) -> None:
        # Temporary files of writers killed mid-write; hidden, but not worth keeping.
        for folder in storage.listdir(self.fs, self.root):
            for path in storage.listdir(self.fs, folder) if self.fs.isdir(folder) else []:
                if ".inprogress-" in path.rsplit("/", 1)[-1]:
                    self.fs.rm(path)

    def committed_parts(self, remove_others: bool = False) -> list[str]:
        """Paths of the metadata parts that count: those the live attempt accepted, and its own.

        Any other part was committed by an attempt after a newer one had started (a driver that was killed
        while its writers still ran); its rows are generated again by the newer attempt, so with
        `remove_others` it is deleted rather than counted twice."""
        folder = self.path(METADATA_DIR)
        parts = [p for p in storage.listdir(self.fs, folder)
                 if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(".")]
        ledger = self.read_json(ATTEMPT_FILE)
        if ledger is None:  # no attempt recorded yet (or an output written before attempts were): all count
            return sorted(parts)
        accepted = set(ledger["accepted"])
        counted, strays = [], []
        for path in parts:
            name = part_name(path)
            (counted if name in accepted or part_attempt(name) == ledger["attempt"] else strays).append(path)
        if remove_others:
            for path in strays:
                storage.with_retries(lambda path=path: self.fs.rm(path), what=f"delete {path}")
        return sorted(counted)

    def iter_metadata(self, columns: list[str], parts: list[str] | None = None, batch_size: int = 65536):
        """Record batches of the committed metadata, one part at a time (memory stays at one batch)."""
        for path in self.committed_parts() if parts is None else parts:
            with self.fs.open(path, "rb") as fh:
                yield from pq.ParquetFile(fh).iter_batches(columns=columns, batch_size=batch_size)

    def metadata(self, columns: list[str] | None = None):
        """All committed metadata rows as one table (or None before the first commit): for tests and small runs."""
        parts = self.committed_parts()
        if not parts:
            return None
        return storage.with_retries(
            lambda: pq.read_table(parts, filesystem=storage.pyarrow_filesystem(self.fs), columns=columns),
            what=f"read {self.path(METADATA_DIR)}")
