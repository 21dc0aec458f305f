"""Submit a run to a Ray cluster as a Ray job: `python -m jobs.submit --address URL -- <jobs.generate args>`.

The same as `ray job submit --working-dir . -- python -m jobs.generate ...`, plus: the arguments are checked
here before anything is uploaded, the submission id is derived from the run (its output path and window) so a
second submission of a run that is still going is refused, logs are followed, and the exit status is the job's.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import shlex
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
UPLOAD_EXCLUDES = [".venv/", ".git/", "outputs/", "__pycache__/", "*.pyc", ".pytest_cache/", ".whl/", ".bench/"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ACTIVE = ("PENDING", "RUNNING")


class SubmitError(RuntimeError):
    """A problem before or while submitting; its message is one line a user can act on."""


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    generate_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, generate_args = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(prog="python -m jobs.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=None,
                        help=f"the cluster's dashboard URL (default: $RAY_ADDRESS if it is http(s), else {DEFAULT_ADDRESS})")
    parser.add_argument("--working-dir", default=str(PROJECT_ROOT), help="uploaded as the job's working directory")
    parser.add_argument("--no-wait", action="store_true", help="submit and return; do not follow the logs")
    parser.add_argument("--submission-id", help="override the id derived from the run")
    args = parser.parse_args(argv)
    if not generate_args:
        parser.error("pass the run's arguments after --, e.g. -- --preset tiny --input P --output O")
    return args, generate_args


def ensure_token_auth() -> None:
    """Use token auth when a token is at hand (Ray's default for clusters started with `ray start`).

    The client must be told, via RAY_AUTH_MODE, before Ray reads its settings on import.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.exists():
        os.environ["RAY_AUTH_MODE"] = "token"


def resolve_run(generate_args: list[str]) -> tuple[list[str], str, str]:
    """Validate the run here (fast, no models) and pin `--window auto` to a concrete window.

    Returns the arguments to send, the run's output path, and its window ('' if none).
    """
    from jobs.generate import parse_args as parse_generate_args
    from pipeline.config import load_config

    parsed = parse_generate_args(generate_args)
    config = load_config(parsed.config, parsed.overrides, input_path=parsed.input, output_path=parsed.output,
                         preset=parsed.preset, window=parsed.window)
    args = list(generate_args)
    if parsed.window == "auto":  # the id and the job must name the same window, even across midnight
        args = _replace_option(args, "--window", config.run.window)
    return args, config.output.path, config.run.window or ""


def _replace_option(args: list[str], option: str, value: str) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == option:
            out += [option, value]
            skip = True
        elif arg.startswith(option + "="):
            out.append(f"{option}={value}")
        else:
            out.append(arg)
    return out


def run_submission_id(output_path: str, window: str) -> str:
    """unclip-<window>-<hash of the output path>: the same run always gets the same id."""
    digest = hashlib.blake2b(output_path.encode(), digest_size=4).hexdigest()
    name = re.sub(r"[^0-9A-Za-z_-]", "-", window)[:40]
    return f"unclip-{name}-{digest}" if name else f"unclip-{digest}"


def next_attempt_id(client, base: str) -> tuple[str | None, str | None]:
    """(id to submit, None), or (None, id of a job of this run that is still going)."""
    statuses = {}
    for job in client.list_jobs():
        sid = job.submission_id or ""
        if sid == base or sid.startswith(base + "-attempt"):
            statuses[sid] = str(job.status)
    for sid, status in statuses.items():
        if status.split(".")[-1] in ACTIVE:
            return None, sid
    if base not in statuses:
        return base, None
    attempt = 2
    while f"{base}-attempt{attempt}" in statuses:
        attempt += 1
    return f"{base}-attempt{attempt}", None


def runtime_env(working_dir: str) -> dict:
    from pipeline.storage import forwarded_env

    # Only endpoint and region travel; credentials come from the cluster's IAM role or its own environment.
    env = {"PYTHONUNBUFFERED": "1", **forwarded_env()}
    if os.environ.get("UNCLIP_RAY_CACHE"):
        env["UNCLIP_RAY_CACHE"] = os.environ["UNCLIP_RAY_CACHE"]
    return {"working_dir": working_dir, "excludes": UPLOAD_EXCLUDES, "env_vars": env}


async def _follow(client, submission_id: str) -> None:
    async for lines in client.tail_job_logs(submission_id):
        print(lines, end="", flush=True)


def wait(client, submission_id: str, follow: bool, poll_s: float = 2.0) -> str:
    if follow:
        asyncio.run(_follow(client, submission_id))
    while True:
        status = str(client.get_job_status(submission_id)).split(".")[-1]
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def submit(address: str, generate_args: list[str], *, working_dir: str = str(PROJECT_ROOT),
           submission_id: str | None = None, follow: bool = True, wait_for_end: bool = True) -> tuple[str, str]:
    """Submit one run; returns (submission id, final status or 'SUBMITTED')."""
    ensure_token_auth()
    args, output_path, window = resolve_run(generate_args)
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - connection and auth failures all become one line
        raise SubmitError(_connection_hint(address, exc)) from None
    base = submission_id or run_submission_id(output_path, window)
    chosen, running = next_attempt_id(client, base)
    if running is not None:
        raise SubmitError(f"job {running} for this run ({output_path}) is still going; follow it with "
                          f"`ray job logs -f {running}` or stop it with `ray job stop {running}`")
    entrypoint = " ".join(["python", "-m", "jobs.generate", *(shlex.quote(a) for a in args)])
    client.submit_job(entrypoint=entrypoint, submission_id=chosen, runtime_env=runtime_env(working_dir),
                      metadata={"output": output_path, "window": window})
    print(f"submitted {chosen} to {address}: {entrypoint}", flush=True)
    if not wait_for_end:
        return chosen, "SUBMITTED"
    return chosen, wait(client, chosen, follow)


def _connection_hint(address: str, exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "401" in text or "403" in text or "auth" in text.lower() or "token" in text.lower():
        return (f"the Ray cluster at {address} refused the request ({text}); it needs the cluster's token: run "
                "`ray get-auth-token` on the head and put it in ~/.ray/auth_token or RAY_AUTH_TOKEN")
    return f"cannot reach the Ray dashboard at {address} ({text}); pass --address http://HEAD:8265 or set RAY_ADDRESS"


def main(argv: list[str] | None = None) -> int:
    ensure_token_auth()  # before anything imports ray
    args, generate_args = parse_args(argv)
    address = args.address or os.environ.get("RAY_ADDRESS", "")
    if not address.startswith(("http://", "https://")):
        address = DEFAULT_ADDRESS
    from jobs.generate import RUN_LEVEL_ERRORS

    try:
        submission_id, status = submit(address, generate_args, working_dir=args.working_dir,
                                       submission_id=args.submission_id, follow=not args.no_wait,
                                       wait_for_end=not args.no_wait)
    except (SubmitError, *RUN_LEVEL_ERRORS) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped following; the job keeps running (`ray job stop <id>` stops it)", file=sys.stderr)
        return 130
    print(f"job {submission_id}: {status}")
    return 0 if status in ("SUCCEEDED", "SUBMITTED") else 1


if __name__ == "__main__":
    sys.exit(main())
