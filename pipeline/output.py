"""The output directory as run state: modes, the recorded config, the lease, committed parts, cleanup, the summary."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import IMAGE_MODES, Config, to_dict
from pipeline.lease import LEASE_FILE, LeaseError, OutputLease
from pipeline.rowids import IdSet, digests
from pipeline.report import CONTACT_SHEET_FILE, REPORT_FILE
from pipeline.writer import (IMAGES_DIR, METADATA_DIR, SHARDS_DIR, SINKS, STATS_DIR, ShardNumbers, legacy_part_attempt,
                             shard_number)

RUN_FILE = "_run.json"
SUCCESS_FILE = "_SUCCESS.json"
ATTEMPT_FILE = "_attempt.json"
"""The live attempt, the metadata parts it accepted from earlier attempts, and the shard numbers it reserved
([first_shard, shard_end)): a part counts as committed only if it is listed there or is numbered in the live
attempt's range, so a dead attempt's late commit never counts."""
LEASE_SETTLE_S = 2.0
PRODUCT_ENTRIES = frozenset({RUN_FILE, SUCCESS_FILE, ATTEMPT_FILE, LEASE_FILE, REPORT_FILE, CONTACT_SHEET_FILE,
                             METADATA_DIR, IMAGES_DIR, SHARDS_DIR, STATS_DIR})
"""Everything a run writes at the top of its output: all that output.mode=overwrite may delete."""
PROBE_PREFIX = ".write-probe-"

# Settings that change only speed or placement: a run may resume with different values.
RESUME_NEUTRAL = ("batch_size", "num_gpus", "num_cpus", "replicas", "storage_options", "output.mode",
                  "output.shard_size", "output.lease_s", "output.path", "input.path", "input.limit", "run.")
WINDOW_KEY = "run.window"
LOSSLESS_FORMATS = ("png",)
MODE_ONLY_KEYS = {"input.image_column": IMAGE_MODES, "models.image_encoder": IMAGE_MODES,
                  "stages.image_encoder.dtype": IMAGE_MODES, "interpolation.frames": ("interpolation",),
                  "textdiff.frames": ("textdiff",), "textdiff.theta_max": ("textdiff",)}
"""Settings only some modes read: other runs leave them out of their identity (a text run also its `mode`, as runs
made before the image modes existed did, so their outputs resume as before)."""
DROPPED_WHEN_UNUSED = ("output.quality",) + tuple(MODE_ONLY_KEYS)
"""Identity keys a run leaves out when they cannot change its outputs."""
RESOLVED_PREFIX = "resolved."
"""Identity keys known only once the plan is made: each stage's device type and the dtype it computes in."""


class OutputError(ValueError):
    """The output path cannot be used as asked (exists with error_if_exists, or holds a different run)."""


@dataclass
class ResumeState:
    committed_parts: list[str] = field(default_factory=list)
    """The metadata parts earlier attempts committed: their rows are not generated again (ids: `committed_ids`)."""
    shard_numbers: ShardNumbers = field(default_factory=ShardNumbers)
    """The shard numbers this attempt reserved: above every number an earlier attempt could have used."""
    finished: dict | None = None
    """The summary of a run that already finished here, if any."""

    @property
    def committed_shards(self) -> set[str]:
        return {part_name(path) for path in self.committed_parts}


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
    flat = _flatten(to_dict(config))
    identity = {k: v for k, v in flat.items()
                if not any(k == n or k.endswith("." + n) or k.startswith(n) for n in RESUME_NEUTRAL)}
    if config.output.image_format in LOSSLESS_FORMATS:  # the quality setting changes no pixel there
        identity.pop("output.quality", None)
    for key, modes in MODE_ONLY_KEYS.items():
        if config.mode not in modes:
            identity.pop(key, None)
    if not config.image_mode:
        identity.pop("mode", None)
    if not config.output.save_embeddings:  # as in outputs made before the setting existed
        identity.pop("output.save_embeddings", None)
    if flat[WINDOW_KEY] is not None:  # one output, one window: another window here is a different run
        identity[WINDOW_KEY] = flat[WINDOW_KEY]
    identity.update({RESOLVED_PREFIX + stage: value for stage, value in (resolved or {}).items()})
    return identity


def differing_keys(recorded: dict, current: dict) -> list[str]:
    if not any(k.startswith(RESOLVED_PREFIX) for k in recorded) or not any(
            k.startswith(RESOLVED_PREFIX) for k in current):
        # Compared once both sides know them: before planning, and against runs that did not record them.
        recorded = {k: v for k, v in recorded.items() if not k.startswith(RESOLVED_PREFIX)}
        current = {k: v for k, v in current.items() if not k.startswith(RESOLVED_PREFIX)}
    # A setting the current run leaves out changes nothing for it (quality for png), whatever was recorded.
    recorded = {k: v for k, v in recorded.items() if k in current or k not in DROPPED_WHEN_UNUSED}
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))


def same_input(summary: dict, input_fingerprint: str | None) -> bool:
    """Whether a finished run's summary was made from the input with this fingerprint (the input's files,
    sizes and row counts): new or removed rows make a finished output unfinished."""
    return input_fingerprint is None or summary.get("input_fingerprint") in (None, input_fingerprint)


def _written_by_a_run(name: str) -> bool:
    # Besides the product's names: a probe or temporary file of a process killed while writing it.
    return name in PRODUCT_ENTRIES or name.startswith(PROBE_PREFIX) or ".inprogress-" in name


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def part_name(path: str) -> str:
    """A metadata part's shard name: its file name without .parquet."""
    return _name(path)[: -len(".parquet")]


def _in_live_attempt(shard: str, ledger: dict) -> bool:
    number = shard_number(shard)
    if number is not None and "first_shard" in ledger:
        return ledger["first_shard"] <= number < ledger["shard_end"]
    return legacy_part_attempt(shard) == ledger["attempt"]  # an older version's part-<attempt>-<digest>


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
        return [p for p in storage.listdir(self.fs, self.root) if _name(p) != LEASE_FILE]

    def is_empty(self) -> bool:
        return not self._entries()

    def check(self, resolved: dict[str, str] | None = None) -> dict | None:
        """The read-only part of `prepare`, safe before any resource is held: refuses an output the run may
        not use, and returns the summary of a run that already finished here (None otherwise)."""
        try:
            return self._check(resolved)
        except (OutputError, LeaseError):
            raise
        except Exception as exc:  # noqa: BLE001 - missing credentials, an unreachable endpoint, ...: one line
            raise OutputError(f"output {storage.failure(self.config.output.path, exc)}") from None

    def _check(self, resolved: dict[str, str] | None) -> dict | None:
        mode = self.config.output.mode
        url = self.config.output.path
        if storage.with_retries(lambda: self.fs.isfile(self.root), what=f"stat {url}"):
            raise OutputError(f"output {url} is a file; output.path must be a directory (or a prefix in object "
                              "storage): choose another path")
        if mode == "error_if_exists" and not self.is_empty():
            raise OutputError(f"output {url} already has content and output.mode=error_if_exists; "
                              "choose another output path or set output.mode=resume or overwrite")
        if mode == "overwrite":
            foreign = self._foreign_entry()
            if foreign is not None:
                raise OutputError(f"output {url} holds {_name(foreign)!r}, which no run of this product wrote; "
                                  "output.mode=overwrite deletes only an earlier run's files: choose an empty or "
                                  "new output path, or move that away yourself")
            return None
        recorded = self.read_json(RUN_FILE)
        if recorded is not None:
            self._check_identity(recorded.get("identity", {}), run_identity(self.config, resolved))
        return self.read_json(SUCCESS_FILE)

    def _check_identity(self, recorded: dict, current: dict) -> None:
        url = self.config.output.path
        if WINDOW_KEY in recorded and recorded[WINDOW_KEY] != current.get(WINDOW_KEY):
            # Another window in the same output would be taken for finished (or mixed into it).
            raise OutputError(f"output {url} holds window {recorded[WINDOW_KEY]}, not {current.get(WINDOW_KEY)}; "
                              "put {window} in the output path (e.g. --output 's3://bucket/images/{window}') "
                              "so each window has its own output")
        differ = differing_keys(recorded, current)
        if differ:
            raise OutputError(f"output {url} holds a run with different settings ({', '.join(differ)}); "
                              "rerun with the recorded settings, use another output path, or set "
                              "output.mode=overwrite")

    def _foreign_entry(self) -> str | None:
        """The first entry at the output that a run of this product did not write (None if there is none).

        Without a run record nothing there is the product's; with one, only the product's own names are."""
        entries = self._entries()
        if entries and not any(_name(e) == RUN_FILE for e in entries):
            return sorted(entries)[0]
        return next((e for e in sorted(entries) if not _written_by_a_run(_name(e))), None)

    def probe_writable(self) -> None:
        """Write and delete a small object, so a read-only path or missing credentials fail before any model
        loads (raises OutputError with one line)."""
        path = self.path(f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
        try:
            storage.atomic_write(self.fs, path, b"")
            storage.with_retries(lambda: self.fs.rm(path), what=f"delete {path}")
        except Exception as exc:  # noqa: BLE001 - every backend's error becomes the same one line
            raise OutputError(f"output {storage.failure(self.config.output.path, exc, 'written')}") from None

    def acquire(self) -> str:
        """Claim the output for this driver (see pipeline.lease); returns the attempt id. Raises LeaseError."""
        attempt = self.claim()
        self.confirm()
        return attempt

    def claim(self) -> str:
        """The first half of `acquire`: refuse at once if another run holds the output, else write our claim;
        returns the attempt id. Call `confirm` before writing anything else to the output."""
        ttl = float(self.config.output.lease_s)
        self.lease = OutputLease(self.fs, self.root, self.config.output.path, ttl_s=ttl,
                                 settle_s=min(LEASE_SETTLE_S, ttl / 4))
        try:
            self.lease.claim()
        except LeaseError:
            self.lease = None
            raise
        return self.lease.attempt

    def confirm(self) -> None:
        """The second half of `acquire`: LeaseError if another driver claimed the output at the same time."""
        try:
            self.lease.confirm()
        except LeaseError:
            self.lease = None
            raise

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def lost_lease(self) -> str | None:
        return self.lease.lost if self.lease is not None else None

    def prepare(self, resolved: dict[str, str] | None = None, input_fingerprint: str | None = None,
                input_rows: int = 0) -> ResumeState:
        """With the lease held: apply output.mode, check the recorded run matches, record this attempt, and
        find the parts earlier attempts committed.

        A finished run counts as finished only for the input it read (`input_fingerprint`); for a changed input
        its completion marker is dropped and the run goes on as a resume: rows it has not seen are generated."""
        if self.lease is None:
            raise RuntimeError("prepare() needs the output lease: call acquire() first")
        state = ResumeState(finished=self.check(resolved))
        if state.finished is not None:
            if same_input(state.finished, input_fingerprint):
                return state
            state.finished = None
            self.fs.rm(self.path(SUCCESS_FILE))
        if self.config.output.mode == "overwrite":
            for entry in self._entries():
                storage.with_retries(lambda entry=entry: self.fs.rm(entry, recursive=True), what=f"delete {entry}")
        recorded = self.read_json(RUN_FILE)
        identity = run_identity(self.config, resolved)
        if recorded is None or set(identity) - set(recorded.get("identity", {})):
            self.write_json(RUN_FILE, {"identity": identity})  # first attempt, or one that now knows more
        self._remove_in_progress()
        earlier = self.committed_parts(remove_others=True)
        ledger = self.read_json(ATTEMPT_FILE) or {}
        # Every shard holds at least one row; twice the input's rows leaves room for batches Ray re-forms after
        # losing a node. The next attempt starts above this range whether or not it was used.
        first = int(ledger.get("shard_end", 0))
        end = first + 2 * max(input_rows, 1) + 64
        self.write_json(ATTEMPT_FILE, {"attempt": self.lease.attempt, "accepted": sorted(map(part_name, earlier)),
                                       "first_shard": first, "shard_end": end})
        state.shard_numbers = ShardNumbers(first, end)
        state.committed_parts = earlier
        return state

    def committed_ids(self, parts: list[str]) -> IdSet:
        """The ids in these metadata parts: 16 bytes a row, 160 MB at 10M rows (a run builds it off the driver)."""
        return IdSet.from_chunks(digests(batch.column(0).to_pylist()) for batch in self.iter_metadata(["id"], parts))

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
        counted, strays = [], []
        for path in parts:
            name = part_name(path)
            # With no attempt recorded yet (or an output written before attempts were), every part counts.
            counts = ledger is None or name in ledger["accepted"] or _in_live_attempt(name, ledger)
            (counted if counts else strays).append(path)
        if remove_others:
            for path in strays:
                storage.with_retries(lambda path=path: self.fs.rm(path), what=f"delete {path}")
            # The shards' other files (tars, stats) that no counted part commits: strays' and never-committed ones.
            SINKS[self.config.output.format].cleanup(self.fs, self.root, {part_name(p) for p in counted})
        return sorted(counted)

    def committed_rows(self) -> int:
        """Rows committed so far, from the parts' footers (no data read)."""
        def rows(path: str) -> int:
            with self.fs.open(path, "rb") as fh:
                return pq.ParquetFile(fh).metadata.num_rows

        return sum(storage.with_retries(lambda path=path: rows(path), what=f"read {path}")
                   for path in self.committed_parts())

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
