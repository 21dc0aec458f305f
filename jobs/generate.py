"""The main job: `python -m jobs.generate --config run.yaml --input ... --output ...` (also the Ray job entrypoint)."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.checkpoints import CheckpointError
from pipeline.config import ConfigError, load_config
from pipeline.lease import LeaseError
from pipeline.output import OutputError
from pipeline.reader import InputError
from pipeline.run import RunFailed, RunInterrupted, disconnect_ray

INTERRUPTED_EXIT = 130
"""What a shell reports for a command stopped by Ctrl-C (128 + SIGINT)."""
RUN_LEVEL_ERRORS = (ConfigError, InputError, CheckpointError, OutputError, LeaseError, RunFailed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--input", help="prompts: Parquet file, directory or glob at any fsspec URL (input.path)")
    parser.add_argument("--output", help="output directory at any fsspec URL (output.path)")
    parser.add_argument("--preset", help="built-in model preset, e.g. 'tiny'")
    parser.add_argument("--window", help="scheduled-run window substituted for {window} in paths; 'auto' = now")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="generate only the first N input rows, to try a run (input.limit); rerun without it to "
                             "go on with the rest in the same output")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show Ray's and the model libraries' own output (run.verbose)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set stages.decoder.steps=50 (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides + (["run.verbose=true"] if args.verbose else [])
                             + ([f"input.limit={args.limit}"] if args.limit is not None else []),
                             input_path=args.input, output_path=args.output, preset=args.preset, window=args.window)
        from pipeline.run import generate

        result = generate(config)
    except RUN_LEVEL_ERRORS as exc:
        disconnect_ray()  # stops Ray streaming the failed actors' logs, so the error is the last line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: the run shut its streaming execution down and let go of the output
        disconnect_ray()
        print(exc if isinstance(exc, RunInterrupted) else "interrupted; rerun the same command to resume",
              file=sys.stderr)
        return INTERRUPTED_EXIT
    summary = result.summary
    counts = summary["counts"]
    if result.already_done:
        window = f"window {config.run.window} " if config.run.window else ""
        print(f"{window}already complete: {summary['output']} ({counts['ok']} ok, {counts['error']} error rows); "
              "nothing to do")
        return 0
    print(f"done: {counts['ok']} ok, {counts['error']} error, {counts['skipped']} skipped (finished earlier) "
          f"of {counts['input_rows']} rows; {counts['images_this_attempt']} images made this attempt in {summary['wall_time_s']:.1f}s "
          f"({summary['images_per_s']} images/s), {counts['images']} in the output")
    print(f"output: {summary['output']} (images, metadata/*.parquet, report.json, contact_sheet.png, _SUCCESS.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
