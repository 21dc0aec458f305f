"""Scheduled-run windows: resolve `--window auto` to the current UTC day or hour and template paths with it."""

from __future__ import annotations

from datetime import date, datetime, timezone

PLACEHOLDER = "{window}"
FORMATS = {"day": "%Y-%m-%d", "hour": "%Y-%m-%dT%H"}


class WindowError(ValueError):
    pass


def resolve(window: str | date | None, granularity: str, now: datetime | None = None) -> str | None:
    """The concrete window: 'auto' becomes the current UTC day (2026-11-24) or hour (2026-11-24T05).

    An explicit window must be a real calendar day or day-hour in one of those two forms, so a typo
    ('yesterday', '2026-13-45') fails instead of running as a window that no schedule will ever produce again.
    """
    if window is None:
        return None
    if isinstance(window, datetime):  # YAML reads an unquoted 2026-11-24T05:00 as a datetime
        return window.strftime(FORMATS["hour"])
    if isinstance(window, date):  # ... and an unquoted 2026-11-24 as a date
        return window.strftime(FORMATS["day"])
    if window == "auto":
        return (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime(FORMATS[granularity])
    for fmt in FORMATS.values():
        try:
            if datetime.strptime(window, fmt).strftime(fmt) == window:  # also refuses unpadded forms: 2026-1-5
                return window
        except (TypeError, ValueError):
            continue
    raise WindowError(f"run.window {window!r} is not a date (YYYY-MM-DD, e.g. 2026-11-24), a date and hour "
                      "(YYYY-MM-DDTHH, e.g. 2026-11-24T05) or 'auto'")


def fill(path: str, key: str, window: str | None) -> str:
    """`path` with {window} replaced; a template without a window is an error that says how to pass one."""
    if PLACEHOLDER not in path:
        return path
    if window is None:
        raise WindowError(f"{key} contains {PLACEHOLDER} ({path}); pass --window DATE (or --window auto, or set "
                          "run.window)")
    return path.replace(PLACEHOLDER, window)
