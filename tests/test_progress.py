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


class _Placed:
    """Stands in for the driver's printer: how many actors of each stage were placed."""

    def __init__(self, counts):
        self.counts = counts

    def placed_counts(self):
        return self.counts


def test_startup_watch_warns_about_missing_actors_and_stops_a_stage_with_none(monkeypatch):
    import _thread

    from pipeline.progress import StartupWatch

    interrupts = []
    monkeypatch.setattr(_thread, "interrupt_main", lambda: interrupts.append(True))
    stream = io.StringIO()
    watch = StartupWatch(_Placed({"prior": 2, "decoder": 1}), {"prior": 2, "decoder": 2, "upsampler_256": 1}, 0.05,
                         stream)
    watch._thread.join(5)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "warning: stage decoder has 1 of its 2 planned actors after 0 s; the cluster cannot place the others (free "
        "CPUs / GPUs / memory), so the run is slower than planned",
        "warning: stage upsampler_256 has 0 of its 1 planned actors after 0 s; the cluster cannot place the others "
        "(free CPUs / GPUs / memory), so the run is slower than planned"]
    assert interrupts == [True] and watch.failure.startswith("stage upsampler_256: none of its 1 actors could be placed")

    calm = io.StringIO()
    quiet = StartupWatch(_Placed({"prior": 2}), {"prior": 2}, 0.05, calm)
    quiet._thread.join(5)
    assert calm.getvalue() == "" and quiet.failure is None and interrupts == [True]
    stopped = StartupWatch(_Placed({}), {"prior": 2}, 30, io.StringIO())
    stopped.stop()  # the run ended first: nothing to check
    stopped._thread.join(5)
    assert not stopped._thread.is_alive() and stopped.failure is None
