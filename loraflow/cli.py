"""`loraflow run [--config FILE] [--report FILE]`: run the fine-tuning flow (the demo without a config)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraflow")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the fine-tuning flow")
    run.add_argument("--config", type=Path, help="YAML run config (default: the built-in demo)")
    run.add_argument("--report", type=Path, help="also write the JSON run report here")
    args = parser.parse_args(argv)

    # Prefect's embedded server needs more than its default 20 s to start on a small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import yaml
    from pydantic import ValidationError

    from flows.finetune import finetune
    from loraflow.config import RunConfig

    try:
        cfg = RunConfig.from_yaml(args.config) if args.config else RunConfig.demo()
    except (OSError, ValidationError, ValueError, yaml.YAMLError) as exc:
        print(f"loraflow: bad config {args.config}: {exc}", file=sys.stderr)
        return 2
    state = finetune(cfg, return_state=True)
    if not state.is_completed():
        try:
            state.result()
        except Exception as exc:
            print(f"loraflow: run failed: {exc}", file=sys.stderr)
        return 1
    report = state.result()
    if args.report:
        args.report.write_text(report.model_dump_json(indent=2))
    print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
