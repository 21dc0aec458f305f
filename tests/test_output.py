"""Output directory state: modes, the recorded run identity, committed rows, cleanup, the finished no-op."""

from __future__ import annotations

import json

import pytest

from pipeline.config import load_config
from pipeline.output import RUN_FILE, SUCCESS_FILE, OutputDir, OutputError
from pipeline.writer import ShardWriter
from tests.test_writer import batch


def config(output, *sets):
    return load_config(None, ["models.unclip=/x", *sets], input_path="in", output_path=str(output))


def test_error_if_exists_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something").write_text("x")
    with pytest.raises(OutputError, match="already has content and output.mode=error_if_exists"):
        OutputDir(config(tmp_path / "out", "output.mode=error_if_exists")).prepare()
    assert OutputDir(config(tmp_path / "fresh", "output.mode=error_if_exists")).prepare().done_ids == set()


def test_overwrite_starts_from_nothing(tmp_path):
    out = tmp_path / "out"
    ShardWriter(config(out))(batch())
    OutputDir(config(out)).prepare()
    state = OutputDir(config(out, "output.mode=overwrite")).prepare()
    assert state.done_ids == set() and not (out / "metadata").exists() and (out / RUN_FILE).exists()


def test_resume_loads_committed_rows_and_refuses_other_settings(tmp_path):
    out = tmp_path / "out"
    OutputDir(config(out)).prepare()
    ShardWriter(config(out))(batch())
    state = OutputDir(config(out, "stages.decoder.batch_size=64", "stages.prior.replicas=3")).prepare()
    assert state.done_ids == {"row-0", "row-1", "bad"}, "batching and placement may change between attempts"
    with pytest.raises(OutputError, match=r"different settings \(seed, stages.decoder.steps\)"):
        OutputDir(config(out, "seed=9", "stages.decoder.steps=3")).prepare()


def test_uncommitted_shards_and_in_progress_files_are_removed_on_resume(tmp_path):
    out = tmp_path / "out"
    cfg = config(out, "output.format=webdataset")
    OutputDir(cfg).prepare()
    ShardWriter(cfg)(batch())
    (out / "shards" / "part-orphan.tar").write_bytes(b"written, never committed")
    (out / "metadata" / ".part-x.parquet.inprogress-123").write_bytes(b"half")
    state = OutputDir(cfg).prepare()
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"{s}.tar" for s in state.committed_shards]
    assert not list(out.rglob(".*inprogress*"))


def test_a_finished_run_is_reported_not_redone(tmp_path):
    from pipeline.run import generate

    out = tmp_path / "out"
    prompts = tmp_path / "p.parquet"
    from tests.conftest import write_prompts

    write_prompts(prompts, ["x"])
    cfg = load_config(None, [], input_path=str(prompts), output_path=str(out), preset="tiny")
    OutputDir(cfg).prepare()
    (out / SUCCESS_FILE).write_text(json.dumps({"counts": {"ok": 1, "error": 0}, "output": str(out)}))
    result = generate(cfg)  # would need Ray and models if it did any work
    assert result.already_done and result.summary["counts"]["ok"] == 1


class Silent:
    """No progress actor: this test runs no Ray."""

    def __init__(self, *args, **kwargs):
        self.written = 0

    def placement(self):
        return []

    def close(self):
        pass


def test_a_run_that_lost_rows_is_not_declared_finished(tmp_path, monkeypatch):
    """If fewer rows reach the output than preflight counted (input changed or unreadable), no _SUCCESS."""
    import pipeline.run as run
    from tests.conftest import write_prompts

    class NothingCameThrough:
        def iter_batches(self, **kwargs):
            return iter(())

    monkeypatch.setattr(run, "connect_ray", lambda: None)
    monkeypatch.setattr(run, "planned_cluster", lambda config: run.ClusterShape(cpus=2.0, gpus=0))
    monkeypatch.setattr(run, "ProgressPrinter", Silent)
    monkeypatch.setattr(run, "build_dataset", lambda *args, **kwargs: NothingCameThrough())
    out = tmp_path / "out"
    prompts = write_prompts(tmp_path / "p.parquet", ["x", "y"])
    with pytest.raises(run.RunFailed, match="only 0 of 2 input rows reached the output"):
        run.generate(load_config(None, [], input_path=prompts, output_path=str(out), preset="tiny"))
    assert not (out / SUCCESS_FILE).exists()
