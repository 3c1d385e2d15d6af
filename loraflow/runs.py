"""The runs a store has seen: the run reports under `reports/<flow run id>.json`, newest last."""

from __future__ import annotations

import logging

from pydantic import ValidationError

from loraflow.report import Report
from loraflow.store import Store, _modified

logger = logging.getLogger("loraflow.runs")


def reports(store: Store) -> list[Report]:
    """Every readable run report in the store, oldest first (by when it was written)."""
    folder = store.abs("reports")
    store.fs.invalidate_cache(folder)
    try:
        listing = store.fs.ls(folder, detail=True)
    except FileNotFoundError:
        return []
    found = []
    for info in sorted(listing, key=_modified):
        name = info["name"].rsplit("/", 1)[-1]
        if not name.endswith(".json") or ".tmp-" in name:
            continue
        try:
            found.append(Report.model_validate_json(store.fs.cat_file(info["name"])))
        except (ValidationError, ValueError, FileNotFoundError) as exc:
            logger.warning("skipping run report %s: %s", name, type(exc).__name__)
    return found


def latest_report(store: Store) -> Report | None:
    found = reports(store)
    return found[-1] if found else None


class UnknownRun(LookupError):
    pass


def find_report(store: Store, run: str) -> Report:
    """The report of the run whose flow run id starts with `run` ("latest": the newest)."""
    found = reports(store)
    if run == "latest":
        if not found:
            raise UnknownRun(f"no runs are recorded in {store.url}")
        return found[-1]
    matches = [r for r in found if r.flow_run_id.startswith(run)]
    if len(matches) != 1:
        what = "no run" if not matches else f"{len(matches)} runs"
        raise UnknownRun(f"{what} in {store.url} has a flow run id starting with {run!r} (see `loraflow ls`)")
    return matches[0]
