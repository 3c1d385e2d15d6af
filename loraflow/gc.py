"""`loraflow gc`: delete what no kept run needs.

What is kept (the roots, then everything they name):
- the newest `keep` run reports (all of them by default) and the cache record of every task run
  in them, with every object those manifests name; for training, also its final checkpoint, so a
  run asked to train longer still resumes from it;
- everything written after the newest run report: a run that failed or was stopped since left
  records and checkpoints the next run resumes from.

What goes: older reports, records and objects nothing kept names (lists of earlier datasets,
intermediate optimizer checkpoints, superseded latents), temporary files of killed writes
(`.tmp-*`), and this machine's digest rows of the deleted objects. Files outside `objects/`,
`records/` and `reports/` are left alone. gc never runs while a run on the store is live
(`loraflow.live`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import get_type_hints

from loraflow.digests import digests
from loraflow.live import exclusive_gc
from loraflow.manifests import Manifest, Weights
from loraflow.runs import reports
from loraflow.store import PARTIAL, Store, _modified
from tasks import __all__ as TASK_NAMES  # noqa: N812
from tasks.caching import read_manifest

MANAGED = ("objects/", "records/", "reports/")


@dataclass
class Collected:
    deleted: list[str] = field(default_factory=list)  # store-relative paths
    freed_bytes: int = 0
    kept: int = 0
    kept_bytes: int = 0
    reports_dropped: int = 0

    def summary(self, dry_run: bool) -> str:
        verb = "would free" if dry_run else "freed"
        return (f"{verb} {self.freed_bytes / 2**20:.1f} MiB in {len(self.deleted)} file(s) "
                f"({self.reports_dropped} run report(s)); kept {self.kept_bytes / 2**20:.1f} MiB in {self.kept} file(s)")


def manifest_types() -> dict[str, type[Manifest]]:
    import tasks

    found = {}
    for name in TASK_NAMES:
        task = getattr(tasks, name)
        found[task.name] = get_type_hints(task.fn)["return"]
    return found


def collect(store: Store, keep: int | None = None, dry_run: bool = False) -> Collected:
    with exclusive_gc(store):
        return _collect(store, keep, dry_run)


def _collect(store: Store, keep: int | None, dry_run: bool) -> Collected:
    files = _files(store)
    runs = reports(store)
    kept_runs = runs if keep is None else runs[max(0, len(runs) - keep):]
    newest = max((_modified(files[f"reports/{r.flow_run_id}.json"]) for r in runs
                  if f"reports/{r.flow_run_id}.json" in files), default=float("-inf"))

    needed = {f"reports/{r.flow_run_id}.json" for r in kept_runs}
    needed |= {p for r in kept_runs for p in files if p.startswith(f"reports/{r.flow_run_id}/")}  # its charts
    types = manifest_types()
    for report in kept_runs:
        for row in report.tasks:
            needed |= _named_by_record(store, files, f"records/{row.cache_key}", types[row.task])

    out = Collected()
    dropped_reports = {f"reports/{r.flow_run_id}.json" for r in runs} - needed
    for path, info in sorted(files.items()):
        size = int(info.get("size") or 0)
        partial = PARTIAL in path.rsplit("/", 1)[-1]
        if not partial and (path in needed or _modified(info) > newest):
            out.kept += 1
            out.kept_bytes += size
            continue
        out.deleted.append(path)
        out.freed_bytes += size
    out.reports_dropped = len(dropped_reports)
    if not dry_run:
        for path in out.deleted:
            store.fs.rm_file(store.abs(path))
        digests().forget([store.url_of(p) for p in out.deleted if p.startswith("objects/")])
    return out


def _files(store: Store) -> dict[str, dict]:
    """{store-relative path: fsspec info} of every file under the folders gc manages."""
    skip = len(store.fs._strip_protocol(store.root)) + 1
    found = {}
    for folder in MANAGED:
        store.fs.invalidate_cache(store.abs(folder.rstrip("/")))
        try:
            listing = store.fs.find(store.abs(folder.rstrip("/")), detail=True)
        except FileNotFoundError:
            continue
        found |= {store.fs._strip_protocol(path)[skip:]: info for path, info in listing.items()}
    return found


def _named_by_record(store: Store, files: dict[str, dict], record: str, manifest_type: type[Manifest]) -> set[str]:
    """The record and every file its manifest needs (objects with their checksum files)."""
    if record not in files:
        return set()
    try:
        manifest, _ = read_manifest(store.fs.cat_file(store.abs(record)), manifest_type)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        manifest = None
    if manifest is None:  # unreadable: the next run drops it anyway
        return set()
    paths = [ref.path for ref in manifest.refs()]
    if isinstance(manifest, Weights):  # its final checkpoint (same key as its weights): training longer resumes from it
        paths.append(Store.object_path("checkpoints", manifest.final.key, "safetensors"))
    return {record} | {p for path in paths for p in (path, path + ".sha256")}
