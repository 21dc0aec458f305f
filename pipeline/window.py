"""Scheduled-run windows: resolve `--window auto` to the current UTC day or hour and template paths with it."""

from __future__ import annotations

import re
from datetime import datetime, timezone

PLACEHOLDER = "{window}"
FORMATS = {"day": "%Y-%m-%d", "hour": "%Y-%m-%dT%H"}
# Windows end up in object keys and directory names: keep them to characters every store accepts.
VALID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")


class WindowError(ValueError):
    pass


def resolve(window: str | None, granularity: str, now: datetime | None = None) -> str | None:
    """The concrete window: 'auto' becomes the current UTC day (2026-11-24) or hour (2026-11-24T05)."""
    if window is None:
        return None
    if window == "auto":
        return (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime(FORMATS[granularity])
    if not VALID.match(window):
        raise WindowError(f"run.window {window!r} must be letters, digits, '.', '_' or '-' (e.g. 2026-11-24), "
                          "or 'auto'")
    return window


def fill(path: str, key: str, window: str | None) -> str:
    """`path` with {window} replaced; a template without a window is an error that says how to pass one."""
    if PLACEHOLDER not in path:
        return path
    if window is None:
        raise WindowError(f"{key} contains {PLACEHOLDER} ({path}); pass --window DATE (or --window auto, or set "
                          "run.window)")
    return path.replace(PLACEHOLDER, window)
