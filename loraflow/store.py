"""The artifact store: content-keyed objects on any fsspec filesystem.

Three concepts, as in git:
- a *content key* is the hash of everything that determines an artifact (see `hashing`);
- an *object* is the artifact's bytes at `objects/<kind>/<key>.<ext>`, sealed with its key (see
  `sealed`), plus a checksum file `<path>.sha256` written last, which is what makes the object
  count as present;
- a *manifest* is the small JSON value a task returns: `ObjectRef`s (path, key, sha256).

Writes go to a temporary name and are moved into place, so a reader never sees half a file and
an interrupted write leaves nothing that counts as present. Every read re-hashes the bytes and
checks the key sealed in them: a missing, truncated or altered object, or one copied from another
key, is a miss (`ArtifactMissing`), never a crash or a None.
Checking that a manifest's objects are intact (`broken`) lists them and re-reads only objects
whose stamp (size + ETag or mtime) was never verified before. Tensors are safetensors; nothing
here ever unpickles. Prefect's cache records live in the store too (`StoreRecords`).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from fsspec.asyn import AsyncFileSystem
from fsspec.core import url_to_fs
from prefect.exceptions import ObjectAlreadyExists
from prefect.filesystems import WritableFileSystem
from pydantic import BaseModel, PrivateAttr
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from loraflow.digests import digests, remote_stamp
from loraflow.hashing import sha256_bytes
from loraflow.sealed import seal, sealed_key


PARTIAL = ".tmp-"  # in the name of a file being written; it never counts as an object
STALE_PARTIAL_S = 3600  # a temporary file untouched this long belongs to a write that was killed


class ArtifactMissing(Exception):
    """An object is absent, half-written, does not match its checksum or was made for another key."""


class StoreError(Exception):
    """The store URL cannot be used."""


class ObjectRef(BaseModel):
    path: str  # relative to the store root
    key: str  # content key of the inputs that produced it
    sha256: str  # of the bytes

    def cache_token(self) -> str:
        # Downstream keys depend on what an object *is* (its inputs), not on where it lies or on
        # bit-level noise of recomputing it.
        return self.key


class Store:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        if "://" not in url:  # a local path: make the URLs in reports absolute
            url = str(Path(url).expanduser().resolve())
        self.url = url.rstrip("/")
        self.storage_options = storage_options or {}
        bucket = None
        try:
            self.fs, self.root = url_to_fs(self.url, **self.storage_options)
            self.root = self.root.rstrip("/")
            if isinstance(self.fs, AsyncFileSystem):  # an object store: a mistyped bucket must not be created
                bucket = self.root.split("/", 1)[0]
                if not self.fs.info(bucket):
                    raise FileNotFoundError(bucket)
            else:
                self.fs.makedirs(self.root, exist_ok=True)
        except FileNotFoundError:
            raise StoreError(f"store: {url!r}: bucket {bucket!r} does not exist") from None
        except PermissionError as exc:
            raise StoreError(f"store: access to {url!r} denied ({exc}); check the credentials (the environment, "
                             "storage_options or storage_secret)") from None
        except Exception as exc:  # bad protocol, missing package, unreachable, no permission
            raise StoreError(f"store: cannot open {url!r}: {type(exc).__name__}: {exc}") from exc

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def abs(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def url_of(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    # --- objects -------------------------------------------------------------------------------
    @staticmethod
    def object_path(kind: str, key: str, ext: str) -> str:
        return f"objects/{kind}/{key[:2]}/{key}.{ext}"

    def put(self, kind: str, key: str, data: bytes, ext: str) -> ObjectRef:
        path = self.object_path(kind, key, ext)
        data = seal(data, ext, key)
        digest = sha256_bytes(data)
        self.write_atomic(path, data)
        self.write_atomic(path + ".sha256", digest.encode())  # last: marks the object present
        # Known-good from here on: a later check of this version of the file does not read it back.
        digests().put(remote_stamp(self.url_of(path), self.fs.info(self.abs(path))), digest)
        return ObjectRef(path=path, key=key, sha256=digest)

    def find(self, kind: str, key: str, ext: str) -> ObjectRef | None:
        """The stored, intact object for `key`, or None."""
        path = self.object_path(kind, key, ext)
        try:
            digest = self.fs.cat_file(self.abs(path + ".sha256")).decode().strip()
            ref = ObjectRef(path=path, key=key, sha256=digest)
            self.read(ref)
            return ref
        except (FileNotFoundError, ArtifactMissing, UnicodeDecodeError):
            return None

    def read(self, ref: ObjectRef) -> bytes:
        try:
            data = self.fs.cat_file(self.abs(ref.path))
        except FileNotFoundError:
            raise ArtifactMissing(f"{self.url_of(ref.path)} is missing") from None
        if sha256_bytes(data) != ref.sha256:
            raise ArtifactMissing(f"{self.url_of(ref.path)} does not match its checksum")
        if sealed_key(data, ref.path.rsplit(".", 1)[-1]) != ref.key:
            raise ArtifactMissing(f"{self.url_of(ref.path)} was not made for key {ref.key[:12]}")
        return data

    def broken(self, refs: list[ObjectRef]) -> list[ObjectRef]:
        """The refs whose object is missing, does not match its checksum or was made for another key.

        One listing per object kind; an object is read and re-hashed only if this version of it
        (its stamp) has not been verified before on this machine.
        """
        listing: dict[str, dict] = {}
        for kind in sorted({ref.path.split("/")[1] for ref in refs}):
            self.fs.invalidate_cache(self.abs(f"objects/{kind}"))  # other runs may have written since
            found = self.fs.find(self.abs(f"objects/{kind}"), detail=True)
            self.sweep_partial(found)
            listing.update({self.fs._strip_protocol(path): info for path, info in found.items()})
        bad, stamps = [], {}
        for ref in refs:
            info = listing.get(self.fs._strip_protocol(self.abs(ref.path)))
            if info is None:
                bad.append(ref)
            else:
                stamps[ref.path] = remote_stamp(self.url_of(ref.path), info)
        known = digests().get_many(list(stamps.values()))
        verified = []
        for ref in refs:
            if ref.path not in stamps:
                continue  # not listed: already in `bad`
            stamp = stamps[ref.path]
            if known.get(stamp) == ref.sha256:
                continue
            try:
                self.read(ref)
                verified.append((stamp, ref.sha256))
            except ArtifactMissing:
                bad.append(ref)
        digests().put_many(verified)
        return bad

    def put_tensors(self, kind: str, key: str, tensors: dict[str, torch.Tensor],
                    metadata: dict[str, str] | None = None) -> ObjectRef:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        return self.put(kind, key, save_safetensors(tensors, metadata=metadata), "safetensors")

    def read_tensors(self, ref: ObjectRef) -> dict[str, torch.Tensor]:
        return load_safetensors(self.read(ref))

    # --- plain files ---------------------------------------------------------------------------
    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write `rel` whole or not at all. A failed write (a full disk, a lost connection, a
        signal) removes its temporary file and raises `StoreError` naming the object."""
        final = self.abs(rel)
        tmp = f"{final}{PARTIAL}{uuid.uuid4().hex[:12]}"
        try:
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, final)
        except BaseException as exc:
            try:
                self.fs.rm_file(tmp)
            except Exception:
                pass  # never written, or the filesystem is gone: `sweep_partial` removes it later
            if isinstance(exc, OSError):
                reason = exc.strerror or f"{type(exc).__name__}: {exc}"
                raise StoreError(f"store: cannot write {self.url_of(rel)}: {reason}") from exc
            raise

    def sweep_partial(self, listing: dict[str, dict]) -> None:
        """Remove temporary files in `listing` (an fsspec detail listing) left by writes that were
        killed, once untouched for `STALE_PARTIAL_S`: a write still in progress keeps its file fresh."""
        now = time.time()
        for path, info in listing.items():
            if PARTIAL in path.rsplit("/", 1)[-1] and now - _modified(info) > STALE_PARTIAL_S:
                try:
                    self.fs.rm_file(path)
                except FileNotFoundError:
                    pass  # another run swept it first

    def delete(self, rel: str) -> None:
        if self.fs.exists(self.abs(rel)):
            self.fs.rm(self.abs(rel), recursive=True)

    # --- Prefect's cache records live here too --------------------------------------------------
    def prefect_result_storage(self) -> "StoreRecords":
        """Result storage for Prefect's cache records: `records/<key>` in this store.

        Prefect only accepts result storage saved as a block on its server. The saved block holds
        the store URL and nothing else; the credentials stay in this process.
        """
        records = StoreRecords(url=self.url)
        name = "loraflow-records-" + sha256_bytes(self.url.encode())[:16]
        for attempt in range(5):
            try:
                records.save(name, overwrite=True)
                break
            except ObjectAlreadyExists:  # another run registered the block type or document first
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        records._store = self
        return records


class StoreRecords(WritableFileSystem):
    """Prefect result storage over a loraflow `Store`: records written whole (temporary name, then
    moved), so a concurrent reader never sees half a record."""

    _block_type_name = "loraflow store records"
    url: str
    _store: Store | None = PrivateAttr(None)

    def _records(self) -> Store:
        if self._store is None:  # loaded from the server elsewhere: credentials from the environment
            self._store = Store(self.url)
        return self._store

    # Prefect calls the sync methods with `_sync=True`, and the async ones from async code.
    def read_path(self, path: str, _sync: bool = True) -> bytes:
        store = self._records()
        return store.fs.cat_file(store.abs(f"records/{path}"))

    def write_path(self, path: str, content: bytes, _sync: bool = True) -> str:
        self._records().write_atomic(f"records/{path}", content)
        return path

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self.write_path(path, content)


def _modified(info: dict) -> float:
    """Seconds since the epoch at which a listed file last changed (local `mtime`, S3 `LastModified`)."""
    stamp = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if stamp is None:
        return time.time()  # unknown: never old enough to sweep
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The string metadata in a safetensors file's header."""
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len]).get("__metadata__", {})

