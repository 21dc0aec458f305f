"""Scheduled-run windows: 'auto' resolves to the UTC day or hour, paths are templated, bad windows are refused."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from pipeline import window
from pipeline.config import ConfigError, load_config


def test_auto_is_the_current_utc_day_or_hour():
    now = datetime(2026, 11, 24, 23, 30, tzinfo=timezone(timedelta(hours=-5)))  # 04:30 UTC on the 25th
    assert window.resolve("auto", "day", now) == "2026-11-25"
    assert window.resolve("auto", "hour", now) == "2026-11-25T04"
    assert window.resolve("2026-11-24", "day", now) == "2026-11-24"
    assert window.resolve(None, "day", now) is None


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", " 2026", "x" * 65, "2026 11 24"])
def test_windows_that_are_not_safe_in_paths_are_refused(bad):
    with pytest.raises((ConfigError, window.WindowError)):
        load_config(None, [], input_path="in/{window}", output_path="out/{window}", preset="tiny", window=bad)


def test_paths_are_templated_and_a_template_needs_a_window():
    config = load_config(None, [], input_path="s3://b/prompts/{window}/", output_path="s3://b/images/{window}",
                         preset="tiny", window="2026-11-24")
    assert (config.input.path, config.output.path) == ("s3://b/prompts/2026-11-24/", "s3://b/images/2026-11-24")
    with pytest.raises(ConfigError, match=r"output.path contains \{window\}.*pass --window"):
        load_config(None, [], input_path="in.parquet", output_path="out/{window}", preset="tiny")
    plain = load_config(None, [], input_path="in.parquet", output_path="out", preset="tiny", window="auto")
    assert plain.output.path == "out" and plain.run.window == datetime.now(timezone.utc).strftime("%Y-%m-%d")
