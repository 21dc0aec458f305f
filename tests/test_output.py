"""Output directory state: modes, the recorded run identity, committed rows, cleanup, the finished no-op."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.lease import LeaseError
from pipeline.output import RUN_FILE, SUCCESS_FILE, OutputDir, OutputError
from pipeline.writer import FencedOut, ShardWriter
from tests.test_writer import batch


def config(output, *sets):
    return load_config(None, ["models.unclip=/x", "output.lease_s=1", *sets], input_path="in",
                       output_path=str(output))


@contextlib.contextmanager
def attempt(cfg):
    """One attempt on the output as a run makes it: claim it, prepare it, write as it, let it go."""
    output = OutputDir(cfg)
    output.acquire()
    try:
        state = output.prepare()
        yield output, state, ShardWriter(cfg, state.shard_numbers, output.lease.attempt)
    finally:
        output.release()


def rows_of(ids):
    """A writer batch whose rows have these ids (the last one an error row)."""
    data = batch(n_ok=len(ids) - 1)
    data["id"] = np.array(ids, dtype=object)
    return data


def prepare(cfg):
    with attempt(cfg) as (_, state, _):
        return state


def committed_ids(cfg, state=None):
    """The ids an attempt on this output skips: those in the parts `state` (a new attempt's if None) counts."""
    state = state or prepare(cfg)
    return OutputDir(cfg).committed_ids(state.committed_parts)


def test_error_if_exists_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something").write_text("x")
    with pytest.raises(OutputError, match="already has content and output.mode=error_if_exists"):
        prepare(config(tmp_path / "out", "output.mode=error_if_exists"))
    assert len(committed_ids(config(tmp_path / "fresh", "output.mode=error_if_exists"))) == 0


def test_overwrite_starts_from_nothing(tmp_path):
    out = tmp_path / "out"
    with attempt(config(out)) as (_, _, write):
        write(batch())
    assert len(committed_ids(config(out, "output.mode=overwrite"))) == 0
    assert not (out / "metadata").exists() and (out / RUN_FILE).exists()


def test_resume_loads_committed_rows_and_refuses_other_settings(tmp_path):
    out = tmp_path / "out"
    with attempt(config(out)) as (_, _, write):
        write(batch())
    done = committed_ids(config(out, "stages.decoder.batch_size=64", "stages.prior.replicas=3"))
    assert len(done) == 3, "batching and placement may change between attempts"
    assert done.contains(["row-0", "row-1", "bad", "row-2"]).tolist() == [True, True, True, False]
    with pytest.raises(OutputError, match=r"different settings \(seed, stages.decoder.steps\)"):
        prepare(config(out, "seed=9", "stages.decoder.steps=3"))
    assert len(committed_ids(config(out, "output.quality=80"))) == 3, "png ignores quality"
    lossy = tmp_path / "lossy"
    prepare(config(lossy, "output.image_format=jpg"))
    assert len(committed_ids(config(lossy, "output.image_format=jpeg"))) == 0, "jpg is jpeg"
    with pytest.raises(OutputError, match=r"different settings \(output.quality\)"):
        prepare(config(lossy, "output.image_format=jpeg", "output.quality=80"))


def test_resume_refuses_other_devices_or_dtypes_once_both_are_known(tmp_path):
    out = tmp_path / "out"
    cfg = config(out)
    output = OutputDir(cfg)
    output.acquire()
    output.prepare({"decoder": "cpu fp32"})
    output.release()
    assert OutputDir(cfg).check() is None, "before planning the resolved values are not compared"
    with pytest.raises(OutputError, match=r"different settings \(resolved.decoder\)"):
        OutputDir(cfg).check({"decoder": "cuda fp16"})
    assert OutputDir(cfg).check({"decoder": "cpu fp32"}) is None


def test_uncommitted_shards_and_in_progress_files_are_removed_on_resume(tmp_path):
    out = tmp_path / "out"
    cfg = config(out, "output.format=webdataset")
    with attempt(cfg) as (_, _, write):
        write(batch())
    (out / "shards" / "00099.tar").write_bytes(b"written, never committed")
    (out / "shards" / "00099_stats.json").write_text("{}")
    (out / "metadata" / ".part-x.parquet.inprogress-123").write_bytes(b"half")
    state = prepare(cfg)
    assert len(state.committed_shards) == 1
    (shard,) = state.committed_shards
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"{shard}.tar", f"{shard}_stats.json"]
    stats = json.loads((out / "shards" / f"{shard}_stats.json").read_text())
    assert {k: stats[k] for k in ("shard", "rows", "ok", "error", "images")} == {
        "shard": shard, "rows": 3, "ok": 2, "error": 1, "images": 4} and stats["seconds"] >= 0
    assert not list(out.rglob(".*inprogress*"))


def test_a_second_driver_refuses_while_the_first_holds_the_output_and_takes_over_after(tmp_path):
    cfg = config(tmp_path / "out", "output.lease_s=2")
    first, second = OutputDir(cfg), OutputDir(cfg)
    first.acquire()
    try:
        with pytest.raises(LeaseError, match=r"is in use by another run \(attempt .* lease until"):
            second.acquire()
        time.sleep(2.5)  # the first renews every third of its lease: still alive, still refused
        with pytest.raises(LeaseError, match="is in use by another run"):
            second.acquire()
    finally:
        first.lease._stop.set()  # the first driver dies: it stops renewing without letting go
        first.lease._renewer.join()
    time.sleep(2.1)
    second.acquire()
    second.release()


def test_two_drivers_claiming_at_once_leave_one_owner(tmp_path):
    cfg = config(tmp_path / "out", "output.lease_s=8")
    outputs = [OutputDir(cfg) for _ in range(2)]
    results = [None, None]

    def claim(i):
        try:
            outputs[i].acquire()
            results[i] = "owner"
        except LeaseError:
            results[i] = "refused"

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["owner", "refused"]
    for output in outputs:
        output.release()


def test_a_dead_attempts_late_commit_is_fenced_out_and_never_counted(tmp_path):
    out = tmp_path / "out"
    cfg = config(out)
    with attempt(cfg) as (_, _, dead_writer):
        dead_writer(rows_of(["a", "b"]))
    # A newer attempt starts; the dead one's writer, still running, tries to commit more rows.
    with attempt(cfg) as (output, state, write):
        assert len(committed_ids(cfg, state)) == 2
        with pytest.raises(FencedOut, match="no longer holds output"):
            dead_writer(rows_of(["c", "d"]))
        # Had its commit slipped in between the check and the write, the part is not this attempt's: not counted.
        straggler = ShardWriter(cfg, dead_writer.numbers, dead_writer.attempt)
        straggler._check_lease = lambda fs, root: None
        straggler(rows_of(["c", "d"]))
        write(rows_of(["c", "d"]))
        counted = output.committed_parts(remove_others=True)
        assert len(counted) == 2
        ids = sorted({i for part in counted for i in pq.read_table(part).column("id").to_pylist()})
        assert ids == ["a", "b", "c", "d"]
    assert len(list((out / "metadata").glob("*.parquet"))) == 2, "the straggler's part was removed"


def test_shards_are_numbered_in_sequence_and_a_new_attempt_numbers_above_the_last_ones_range(tmp_path):
    out = tmp_path / "out"
    cfg = config(out, "output.format=webdataset")
    with attempt(cfg) as (output, state, write):
        write(rows_of(["a", "b"]))
        write(rows_of(["c", "d"]))
        write(rows_of(["b", "a"]))  # the same rows again (a retried write): the same shard, replaced
        assert sorted(p.name for p in (out / "shards").glob("*.tar")) == ["00000.tar", "00001.tar"]
        assert sorted(p.name for p in (out / "metadata").iterdir()) == ["00000.parquet", "00001.parquet"]
        first_end = json.loads((out / "_attempt.json").read_text())["shard_end"]
    with attempt(cfg) as (output, state, write):
        assert state.committed_shards == {"00000", "00001"}
        write(rows_of(["e", "f"]))
        assert len(output.committed_parts()) == 3
    assert (out / "shards" / f"{first_end:05d}.tar").exists(), "numbered from where the earlier range ended"


def test_parts_an_older_version_named_still_count_on_resume(tmp_path):
    out = tmp_path / "out"
    cfg = config(out)
    with attempt(cfg) as (_, _, write):
        write(rows_of(["a", "b"]))
    ledger = json.loads((out / "_attempt.json").read_text())
    (out / "metadata" / "00000.parquet").rename(out / "metadata" / f"part-{ledger['attempt']}-0123456789abcdef0123.parquet")
    del ledger["first_shard"], ledger["shard_end"]
    (out / "_attempt.json").write_text(json.dumps(ledger))
    assert len(committed_ids(cfg)) == 2


def test_a_finished_run_is_reported_not_redone(tmp_path):
    from pipeline.run import generate

    out = tmp_path / "out"
    prompts = tmp_path / "p.parquet"
    from tests.conftest import write_prompts

    write_prompts(prompts, ["x"])
    cfg = load_config(None, [], input_path=str(prompts), output_path=str(out), preset="tiny")
    prepare(cfg)
    (out / SUCCESS_FILE).write_text(json.dumps({"counts": {"ok": 1, "error": 0}, "output": str(out)}))
    result = generate(cfg)  # would need Ray and models if it did any work
    assert result.already_done and result.summary["counts"]["ok"] == 1


class Silent:
    """No progress actor: this test runs no Ray."""

    def __init__(self, *args, **kwargs):
        self.written = 0

    def placement(self):
        return []

    def end_actors(self):
        pass

    def close(self):
        pass


def test_a_run_that_lost_rows_is_not_declared_finished(tmp_path, monkeypatch):
    """If fewer rows reach the output than preflight counted (input changed or unreadable), no _SUCCESS."""
    import pipeline.run as run
    from tests.conftest import write_prompts

    class NothingCameThrough:
        """The run's output stream, delivering no rows."""

        def __init__(self, dataset):
            pass

        def __iter__(self):
            return iter(())

        def close(self):
            pass

    monkeypatch.setattr(run, "connect_ray", lambda verbose: None)
    monkeypatch.setattr(run, "planned_cluster", lambda config: run.ClusterShape(cpus=2.0, gpus=0))
    monkeypatch.setattr(run, "ProgressPrinter", Silent)
    monkeypatch.setattr(run, "build_dataset", lambda *args, **kwargs: None)
    monkeypatch.setattr(run, "OutputStream", NothingCameThrough)
    out = tmp_path / "out"
    prompts = write_prompts(tmp_path / "p.parquet", ["x", "y"])
    with pytest.raises(run.RunFailed, match="only 0 of 2 input rows reached the output"):
        run.generate(load_config(None, [], input_path=prompts, output_path=str(out), preset="tiny"))
    assert not (out / SUCCESS_FILE).exists()


def test_another_window_in_the_same_output_is_refused_with_how_to_fix_it(tmp_path):
    out = tmp_path / "w-fixed"
    prepare(config(out, "run.window=2026-11-24"))
    (out / SUCCESS_FILE).write_text(json.dumps({"counts": {"ok": 1, "error": 0}}))
    assert OutputDir(config(out, "run.window=2026-11-24")).check() is not None  # the same window: finished
    with pytest.raises(OutputError, match=r"holds window 2026-11-24, not 2026-11-25; put \{window\} in the output"):
        OutputDir(config(out, "run.window=2026-11-25")).check()


def test_overwrite_deletes_only_what_a_run_wrote(tmp_path):
    foreign = tmp_path / "foreign"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    (foreign / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(OutputError, match=r"holds 'notes.txt', which no run of this product wrote"):
        prepare(config(foreign, "output.mode=overwrite"))
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / "sub" / "data.csv").exists()

    out = tmp_path / "out"
    with attempt(config(out)) as (_, _, write):
        write(batch())
    (out / "notes.txt").write_text("mine")  # a user's file beside a run's output
    with pytest.raises(OutputError, match=r"holds 'notes.txt'"):
        prepare(config(out, "output.mode=overwrite"))
    assert list((out / "metadata").glob("*.parquet")), "nothing was deleted"
    (out / "notes.txt").unlink()
    assert len(committed_ids(config(out, "output.mode=overwrite"))) == 0
    assert not (out / "metadata").exists()


def test_an_output_path_that_is_a_file_or_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"output .*file is a file; output.path must be a directory"):
        OutputDir(config(tmp_path / "file")).check()
    with pytest.raises(OutputError, match=r"cannot be written: .*a file is in the way") as info:
        OutputDir(config(tmp_path / "file" / "below")).probe_writable()
    assert "\n" not in str(info.value)
    OutputDir(config(tmp_path / "fine")).probe_writable()
    assert not any((tmp_path / "fine").iterdir()), "the probe object is removed"


def test_storage_errors_are_one_line_with_what_to_check():
    from pipeline import storage

    class NoCredentialsError(Exception):  # botocore's name; the hint is chosen by class name
        pass

    line = storage.failure("s3://bucket/out", NoCredentialsError("Unable to locate credentials"), "written")
    assert line == ("s3://bucket/out cannot be written: NoCredentialsError: Unable to locate credentials; no usable "
                    "credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or storage_options")
    assert "endpoint cannot be reached" in storage.failure("s3://b", ConnectionRefusedError("refused"))


def test_a_finished_output_is_unfinished_for_an_input_with_other_rows(tmp_path):
    from pipeline.output import same_input

    out = tmp_path / "out"
    with attempt(config(out)) as (_, _, write):
        write(rows_of(["a", "b", "c"]))
    (out / SUCCESS_FILE).write_text(json.dumps({"counts": {"ok": 2, "error": 1}, "input_fingerprint": "three"}))
    assert same_input(json.loads((out / SUCCESS_FILE).read_text()), "three")
    output = OutputDir(config(out))
    output.acquire()
    try:
        state = output.prepare(input_fingerprint="five")  # the input grew: resume the rows it has not seen
    finally:
        output.release()
    assert state.finished is None and len(committed_ids(config(out), state)) == 3 and not (out / SUCCESS_FILE).exists()


def test_text_runs_recorded_before_the_image_modes_still_resume_and_other_modes_are_refused(tmp_path):
    from pipeline.output import differing_keys, run_identity

    text = load_config(None, ["models.unclip=/m"], input_path="in.parquet", output_path=str(tmp_path))
    variation = load_config(None, ["models.unclip=/m", "mode=variation"], input_path="in.parquet",
                            output_path=str(tmp_path))
    current = run_identity(text)
    older = {k: v for k, v in current.items() if k != "mode" and not k.startswith((
        "input.image_column", "models.image_encoder", "stages.image_encoder.", "interpolation.", "textdiff."))}
    assert differing_keys(older, current) == []
    assert differing_keys(run_identity(variation), current) == ["mode"]
    assert "mode" in differing_keys(older, run_identity(variation))
    # Saving embeddings changes the metadata's columns: a resume must keep the setting either way.
    saving = load_config(None, ["models.unclip=/m", "output.save_embeddings=true"], input_path="in.parquet",
                         output_path=str(tmp_path))
    assert differing_keys(run_identity(saving), current) == ["output.save_embeddings"]
    assert differing_keys(current, run_identity(saving)) == ["output.save_embeddings"]
