"""The `loraflow` command (typer): run, plan, ls, show, gc, export, watch, config.

`loraflow run [--config FILE] [--set FIELD=VALUE ...] [--report FILE] [--debug]` runs the flow
(the demo without a config). What a person at a terminal sees:
- progress lines, then the run report;
- on any error, one line `loraflow: ...` naming the file or field, and where the full log is
  (`$LORAFLOW_HOME/logs/`, with every traceback); exit code 2 for a bad config, 1 for a failed run;
- on Ctrl-C or SIGTERM, the run stops within seconds: Prefect marks it Crashed, everything already
  stored stays valid, and the next run resumes from it (exit code 130 or 143).
`--debug` shows everything Prefect logs, tracebacks included.

The store commands (`plan`, `ls`, `show`, `gc`, `export`) take the store from `--store` or from
the config's `store` field (by default the demo's `./loraflow-store`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

EXIT_CONFIG, EXIT_FAILED = 2, 1

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Cached, resumable fine-tuning of text-to-image diffusion models as a Prefect flow.")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML run config (default: the built-in demo)")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", metavar="FIELD=VALUE",
    help="override one config field, e.g. --set train.steps=50 (YAML value; repeatable; "
         "`loraflow config --fields` lists every field)")]
StoreOpt = Annotated[Optional[str], typer.Option("--store", help="store URL (default: the config's store)")]


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised as Ctrl-C is, so the flow engine reports the run as Crashed and
    the CLI exits cleanly."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_signalled: list[int] = []  # the signals this run received: a stop whatever error it surfaces as


def main(argv: list[str] | None = None) -> int:
    """The console script; returns the exit code (so tests can call it in-process)."""
    # Prefect's embedded server needs more than its default 20 s to start on a small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        code = app(args=argv, prog_name="loraflow", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        return 128 + signal.SIGINT
    return code or 0


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"loraflow {version('loraflow')} (prefect {version('prefect')}, torch {version('torch')}, "
              f"diffusers {version('diffusers')}, transformers {version('transformers')}, peft {version('peft')})")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the versions and exit")] = False) -> None:
    pass


@app.command()
def run(config: ConfigOpt = None, set_: SetOpt = None,
        report: Annotated[Optional[Path], typer.Option(help="also write the JSON run report here")] = None,
        debug: Annotated[bool, typer.Option("--debug", help="show Prefect's full log, tracebacks included")] = False) -> int:
    """Run the fine-tuning flow: each stage Cached or computed, then the run report."""
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time notices about optional backends
    cfg = load_config(config, set_)
    log_file, detach_logging = log_to_file(debug)
    try:
        return run_flow(cfg, report, log_file)
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


@app.command()
def plan(config: ConfigOpt = None, set_: SetOpt = None) -> int:
    """Without training: each stage's cache key, whether a run would find it Cached or run it, and why."""
    from loraflow.plan import plan as make_plan
    from loraflow.plan import table

    cfg = load_config(config, set_)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        print(table(make_plan(cfg)))
    except Exception as exc:
        say(f"plan failed: {one_line(exc)}")
        return EXIT_FAILED
    return 0


@app.command("ls")
def ls(config: ConfigOpt = None, store: StoreOpt = None) -> int:
    """The runs recorded in the store, oldest first: when, what ran, and the weights."""
    from loraflow.runs import reports

    opened = open_store(config, store)
    found = reports(opened)
    if not found:
        print(f"no runs recorded in {opened.url}")
        return 0
    print(f"{'run':10} {'finished':25} {'family':6} {'method':6} {'steps':>5} {'computed':>8} {'reused':>7}  samples")
    for r in found:
        computed, reused = sum(t.computed for t in r.tasks), sum(t.reused for t in r.tasks)
        print(f"{r.flow_run_id[:8]:10} {r.finished or '?':25} {r.family or '?':6} {r.method or '?':6} "
              f"{r.final_step or 0:5d} {computed:8d} {reused:7d}  {len(r.samples)}")
    return 0


@app.command()
def show(run_id: Annotated[str, typer.Argument(metavar="RUN", help="a flow run id, or its first characters, or 'latest'")] = "latest",
         config: ConfigOpt = None, store: StoreOpt = None) -> int:
    """One run's report: every stage's state, the weights, and each sample with its prompt and step."""
    from loraflow.runs import UnknownRun, find_report

    opened = open_store(config, store)
    try:
        report = find_report(opened, run_id)
    except UnknownRun as exc:
        say(str(exc))
        return EXIT_FAILED
    print(f"run {report.flow_run_id} ({report.family}, {report.method}, {report.final_step} steps), "
          f"started {report.started}, finished {report.finished}")
    print(report.table())
    for s in report.sample_images:
        print(f"  step {s.step:5d}  #{s.index}  {s.prompt!r}: {s.url}")
    return 0


@app.command()
def gc(config: ConfigOpt = None, store: StoreOpt = None,
       keep: Annotated[Optional[int], typer.Option(min=0, help="keep only the newest N runs (default: all)")] = None,
       dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would go; delete nothing")] = False) -> int:
    """Delete what no kept run needs: older reports, unreferenced objects and records, optimizer
    checkpoints before the final one, leftovers of killed writes. Never while a run is live."""
    from loraflow.gc import collect
    from loraflow.live import StoreBusy

    opened = open_store(config, store)
    try:
        result = collect(opened, keep, dry_run)
    except StoreBusy as exc:
        say(str(exc))
        return EXIT_FAILED
    print(result.summary(dry_run))
    return 0


@app.command()
def export(run_id: Annotated[str, typer.Argument(metavar="RUN", help="a flow run id, its first characters, or 'latest'")] = "latest",
           fmt: Annotated[str, typer.Option("--format", "-f", help="kohya (A1111, ComfyUI, sd-scripts) or diffusers")] = "kohya",
           out: Annotated[Optional[Path], typer.Option(help="file to write (default: a readable name here)")] = None,
           config: ConfigOpt = None, store: StoreOpt = None) -> int:
    """Write a run's LoRA (or full weights) as a file other tools load."""
    from loraflow.export import ExportError
    from loraflow.export import export as export_weights
    from loraflow.export import write
    from loraflow.runs import UnknownRun, find_report

    opened = open_store(config, store)
    try:
        data, name = export_weights(opened, find_report(opened, run_id), fmt)
    except (UnknownRun, ExportError) as exc:
        say(str(exc))
        return EXIT_FAILED
    print(write(data, out or Path(name)))
    return 0


@app.command()
def watch(config: ConfigOpt = None, set_: SetOpt = None) -> int:
    """Emit `loraflow.dataset.changed` if the dataset's listing changed since the last watch (or
    was never watched): the `finetune/on-demand` deployment's trigger then retrains. Needs PREFECT_API_URL."""
    from loraflow.watch import watch as watch_dataset

    cfg = load_config(config, set_)
    try:
        found = watch_dataset(cfg)
    except Exception as exc:
        say(f"watch failed: {one_line(exc)}")
        return EXIT_FAILED
    if found.emitted:
        why = "first watch" if found.previous is None else "listing changed"
        print(f"emitted loraflow.dataset.changed for {found.source} ({why}; {found.files} files)")
    else:
        print(f"unchanged: {found.source} ({found.files} files); no event")
    return 0


@app.command("config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None,
                fields: Annotated[bool, typer.Option("--fields", help="list every field with its type and default")] = False) -> int:
    """Print the effective config as YAML (a starting point for your own), or every field."""
    import yaml

    from loraflow.config import RunConfig

    cfg = load_config(config, set_)
    if fields:
        for name, annotation, default in RunConfig.fields():
            print(f"{name:34} {annotation:40} {default}")
        return 0
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def load_config(path: Path | None, overrides: list[str] | None):
    """The run config (the demo's without a file), with `--set` overrides; a bad one is said and
    ends the command with exit code 2."""
    from loraflow.config import RunConfig

    try:
        return RunConfig.load(path, overrides or [])
    except Exception as exc:
        say(f"bad config {path or '(the demo)'}: {config_problem(exc)}")
        raise typer.Exit(EXIT_CONFIG) from None


def open_store(config: Path | None, url: str | None):
    from loraflow.remote import storage_options
    from loraflow.store import Store

    cfg = load_config(config, [])
    try:
        return Store(url or cfg.store, storage_options(cfg.storage_options, cfg.storage_secret))
    except Exception as exc:
        say(one_line(exc))
        raise typer.Exit(EXIT_FAILED) from None


def run_flow(cfg, report_file: Path | None, log_file: Path) -> int:
    from flows.finetune import finetune
    from loraflow.local_server import prefect_api

    previous = {signum: signal.signal(signum, _raise_stopped) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with prefect_api():
            state = finetune(cfg, return_state=True)
            report = state.result()  # raises the run's error if it failed
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if report_file:
        report_file.write_text(report.model_dump_json(indent=2))
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
