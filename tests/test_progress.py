"""Live progress: stage actors report rows to the run's board; off a terminal, the driver logs a line per interval."""

from __future__ import annotations

import io
import time

from pipeline.progress import ProgressPrinter, StageReporter


def test_progress_lines_count_rows_per_stage(ray_session):
    stream = io.StringIO()  # not a terminal: lines are printed
    printer = ProgressPrinter("progress-test-board", ["prior", "decoder"], total_rows=10, interval_s=0.2,
                              stream=stream)
    try:
        reporter = StageReporter("prior", "progress-test-board")
        assert reporter.metrics is not None  # Ray metrics exist for the dashboard / Prometheus
        reporter.record(rows=4, images=8, errors=1, seconds=0.5)
        reporter.record(rows=3, images=6, errors=0, seconds=0.5)
        deadline = time.time() + 20
        while "prior 7/10" not in stream.getvalue() and time.time() < deadline:
            time.sleep(0.1)
        printer.written = 2
        assert "prior 7/10 | decoder 0/10" in printer.line() and "written 2/10 rows" in printer.line()
    finally:
        printer.close()
    assert "prior 7/10" in stream.getvalue()


def test_reporting_never_fails_a_batch_without_ray_or_a_board():
    StageReporter("prior", None).record(rows=1, images=1, errors=0, seconds=0.1)
    StageReporter("prior", "no-such-board").record(rows=1, images=1, errors=0, seconds=0.1)
