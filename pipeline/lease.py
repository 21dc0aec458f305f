"""The output lease: one live driver per output path, renewed while its run lives, taken over once it lapses."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from pipeline import storage

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"


class LeaseError(ValueError):
    """Another live run holds the output, or this run lost it; one line for the user."""


def new_attempt_id() -> str:
    """Sortable and unique: UTC start time plus random bits (two drivers may start in the same second)."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


@dataclass
class LeaseRecord:
    attempt: str
    owner: str
    expires_at: float

    def describe(self) -> str:
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.expires_at))
        return f"attempt {self.attempt} by {self.owner}, lease until {until}"


class OutputLease:
    """An object beside the outputs naming the attempt that owns them, with an expiry it keeps pushing back.

    Object stores give no compare-and-swap through fsspec, so acquisition is write-then-confirm: after writing
    its record a driver waits `settle_s` and reads it back; of two drivers that started together only the last
    writer sees itself and goes on. A driver that finds it lost the lease while running stops (see `lost`).
    """

    def __init__(self, fs, root: str, url: str, *, ttl_s: float, settle_s: float, attempt: str | None = None):
        self.fs, self.path, self.url = fs, storage.join(root, LEASE_FILE), url
        self.ttl_s, self.settle_s = ttl_s, settle_s
        self.record = LeaseRecord(attempt or new_attempt_id(), f"{socket.gethostname()}:{os.getpid()}", 0.0)
        self.lost: str | None = None
        """Set by the renewer when another attempt took the lease: why this run must stop."""
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._claimed_at = 0.0
        self._confirmed = False

    @property
    def attempt(self) -> str:
        return self.record.attempt

    def read(self) -> LeaseRecord | None:
        return read_lease(self.fs, self.path)

    def _write(self) -> None:
        self.record.expires_at = time.time() + self.ttl_s
        storage.atomic_write(self.fs, self.path, json.dumps(vars(self.record), sort_keys=True).encode())

    def _refuse(self, holder: LeaseRecord) -> LeaseError:
        return LeaseError(f"output {self.url} is in use by another run ({holder.describe()}); wait for it to "
                          "finish, or if it was stopped, rerun after its lease ends")

    def acquire(self) -> None:
        self.claim()
        self.confirm()

    def claim(self) -> None:
        """Write this attempt's record unless another live attempt holds the output (LeaseError at once).
        The claim counts only once `confirm` has read it back; work that writes nothing may go on meanwhile."""
        holder = self.read()
        if holder is not None and holder.attempt != self.attempt and holder.expires_at > time.time():
            raise self._refuse(holder)
        self._write()
        self._claimed_at = time.monotonic()
        # Renewed from now on: what runs before `confirm` (waiting for GPUs) may outlast the lease.
        self._renewer = threading.Thread(target=self._renew, name="output-lease", daemon=True)
        self._renewer.start()

    def confirm(self) -> None:
        """Wait out what is left of `settle_s` since the claim and read the record back: of drivers that claimed
        together, only the last writer goes on; the others raise LeaseError. Once confirmed, calling it again
        does nothing."""
        if self._confirmed:
            return
        time.sleep(max(0.0, self.settle_s - (time.monotonic() - self._claimed_at)))
        holder = self.read()
        if holder is None or holder.attempt != self.attempt:
            self._stop.set()
            raise self._refuse(holder or self.record)
        self._confirmed = True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                holder = self.read()
                if holder is not None and holder.attempt != self.attempt:
                    self.lost = (f"output {self.url} was taken over by another run ({holder.describe()}) while this "
                                 "one ran; this run stopped without committing more")
                    log.error("%s", self.lost)
                    return
                self._write()
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: try again at the next renewal
                log.warning("could not renew the output lease on %s: %s", self.url, exc)

    def release(self) -> None:
        """Stop renewing and remove the record if it is still ours (the next run need not wait for it)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
            holder = self.read()
            if holder is not None and holder.attempt == self.attempt:
                self.fs.rm(self.path)


def read_lease(fs, path: str) -> LeaseRecord | None:
    if not storage.exists(fs, path):
        return None
    try:
        return LeaseRecord(**json.loads(storage.read_bytes(fs, path)))
    except (ValueError, TypeError, FileNotFoundError):
        return None  # removed or half-written between the check and the read: as good as absent
