"""`loraflow run [--config FILE] [--report FILE] [--debug]`: run the fine-tuning flow (the demo without a config).

What a person at a terminal sees:
- progress lines, then the run report;
- on any error, one line `loraflow: ...` naming the file or field, and where the full log is
  (`$LORAFLOW_HOME/logs/`, with every traceback); exit code 2 for a bad config, 1 for a failed run;
- on Ctrl-C or SIGTERM, the run stops within seconds: Prefect marks it Crashed, everything already
  stored stays valid, and the next run resumes from it (exit code 130 or 143).
`--debug` shows everything Prefect logs, tracebacks included.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

EXIT_CONFIG, EXIT_FAILED = 2, 1


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised as Ctrl-C is, so the flow engine reports the run as Crashed and
    the CLI exits cleanly."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_signalled: list[int] = []  # the signals this run received: a stop whatever error it surfaces as


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraflow")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the fine-tuning flow")
    run.add_argument("--config", type=Path, help="YAML run config (default: the built-in demo)")
    run.add_argument("--report", type=Path, help="also write the JSON run report here")
    run.add_argument("--debug", action="store_true", help="show Prefect's full log, tracebacks included")
    args = parser.parse_args(argv)

    # Prefect's embedded server needs more than its default 20 s to start on a small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not args.debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time notices about optional backends
    log_file, detach_logging = log_to_file(args.debug)
    try:
        return run_flow(args, log_file)
    except (Exception, KeyboardInterrupt) as exc:
        logging.getLogger("loraflow").error("run failed" if not _signalled else "run stopped", exc_info=exc)
        if _signalled or isinstance(exc, KeyboardInterrupt):
            # The signal's exception may surface as another error raised while unwinding
            # (cleanup interrupted midway): it is still a stop.
            signum = (_signalled or [signal.SIGINT])[0]
            say(f"stopped by {signal.Signals(signum).name}; what finished is in the store and the next run "
                f"resumes from it (full log: {log_file})")
            return 128 + signum
        say(f"run failed: {one_line(exc)} (full log: {log_file})")
        return EXIT_FAILED
    finally:
        if _signalled:
            from loraflow.batching import STOP

            STOP.clear()
        _signalled.clear()
        detach_logging()


def run_flow(args: argparse.Namespace, log_file: Path) -> int:
    from flows.finetune import finetune
    from loraflow.config import RunConfig
    from loraflow.local_server import prefect_api

    try:
        cfg = RunConfig.from_yaml(args.config) if args.config else RunConfig.demo()
    except Exception as exc:
        say(f"bad config {args.config}: {config_problem(exc)}")
        return EXIT_CONFIG
    previous = {signum: signal.signal(signum, _raise_stopped) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with prefect_api():
            state = finetune(cfg, return_state=True)
            report = state.result()  # raises the run's error if it failed
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if args.report:
        args.report.write_text(report.model_dump_json(indent=2))
    print(report.table())
    return 0


def _raise_stopped(signum, frame):
    from loraflow.batching import STOP

    _signalled.append(signum)
    STOP.set()  # shards in worker threads stop too
    raise Stopped(signum)


def say(message: str) -> None:
    print(f"loraflow: {message}", file=sys.stderr, flush=True)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def config_problem(exc: Exception) -> str:
    """A config error as one line naming each bad field (never its value: it may be a credential)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(_field_problem(e) for e in exc.errors())
    return one_line(exc)


def _field_problem(error: dict) -> str:
    """`field: what is wrong`. A whole-config check has no field of its own; its message names them."""
    message = error["msg"].removeprefix("Value error, ")
    field = ".".join(map(str, error["loc"]))
    return f"{field}: {message}" if field else message


def log_to_file(debug: bool):
    """Everything goes to a log file; the terminal gets progress, and errors only as one line.
    Returns the file and a function that undoes this (for callers of `main` in one process)."""
    from prefect.logging.configuration import setup_logging
    from prefect.logging.formatters import PrefectFormatter

    from loraflow.builtin import cache_root

    setup_logging()  # Prefect's handlers first: ours are added to them, not in their place

    folder = cache_root() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"run-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    start = "%(asctime)s | %(levelname)-7s | "
    handler.setFormatter(PrefectFormatter(  # names the flow run and task run, as on the terminal
        f"{start}%(name)s - %(message)s", flow_run_fmt=f"{start}Flow run %(flow_run_name)r - %(message)s",
        task_run_fmt=f"{start}Task run %(task_run_name)r - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    logging.getLogger("loraflow").setLevel(logging.INFO)
    consoles = [] if debug else [h for h in root.handlers if h is not handler]
    for console in consoles:
        console.addFilter(_terminal_filter)

    def detach() -> None:
        root.removeHandler(handler)
        handler.close()
        for console in consoles:
            console.removeFilter(_terminal_filter)

    return path, detach


def _terminal_filter(record: logging.LogRecord) -> bool:
    """Errors reach the terminal as the CLI's one line; their tracebacks stay in the log file."""
    if record.levelno >= logging.ERROR or record.exc_info:
        return False
    message = record.getMessage()
    return not (message.startswith("Finished in state") and "Completed" not in message and "Cached" not in message)


if __name__ == "__main__":
    sys.exit(main())
