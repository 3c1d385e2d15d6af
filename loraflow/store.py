"""The artifact store: content-keyed objects on any fsspec filesystem.

Three concepts, as in git:
- a *content key* is the hash of everything that determines an artifact (see `hashing`);
- an *object* is the artifact's bytes at `objects/<kind>/<key>.<ext>`, sealed with its key (see
  `sealed`), plus a checksum file `<path>.sha256` written last, which is what makes the object
  count as present;
- a *manifest* is the small JSON value a task returns: `ObjectRef`s (path, key, sha256). A list
  too long to pass by value (a shard's images, every training example) is itself stored as an
  object (kind `lists`) and passed as a `ListRef`.

Writes go to a temporary name and are moved into place, so a reader never sees half a file and
an interrupted write leaves nothing that counts as present. Every read re-hashes the bytes and
checks the key sealed in them: a missing, truncated or altered object, or one copied from another
key, is a miss (`ArtifactMissing`), never a crash or a None.
Checking that a manifest's objects are intact (`broken`), or looking many keys up (`find_many`),
costs one listing per object kind and run, and re-reads only objects whose stamp (size + ETag or
mtime) was never verified on this machine; what this machine wrote is entered as verified.
Tensors are safetensors; nothing here ever unpickles. Prefect's cache records live in the store
too (`StoreRecords`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, TypeVar

import torch
from fsspec.asyn import AsyncFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from prefect.exceptions import ObjectAlreadyExists
from prefect.filesystems import WritableFileSystem
from pydantic import BaseModel, PrivateAttr, TypeAdapter
from safetensors.numpy import save as save_numpy
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from loraflow import listing
from loraflow.digests import digests, stamp_of, version
from loraflow.hashing import content_key, sha256_bytes
from loraflow.sealed import seal, sealed_key, unsealed_json


M = TypeVar("M", bound=BaseModel)
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


def planned(kind: str, key: str, ext: str) -> ObjectRef:
    """The ref an object of `key` will have once stored, as far as it is known before it is made:
    its path and key (all a downstream cache key hashes), not its checksum. For `loraflow plan`."""
    return ObjectRef(path=Store.object_path(kind, key, ext), key=key, sha256="")


class ListRef(BaseModel):
    """A long list (a shard's images, every training example) stored as one object and handed to
    tasks by reference, so what Prefect sees of a task's inputs is O(1) whatever the dataset size.

    `identity` hashes the items' own cache tokens (an image's bytes, not its name or URL): it is
    all a downstream key sees. The object itself is named by its bytes (names and URLs included)."""

    ref: ObjectRef
    count: int
    identity: str

    def cache_token(self) -> str:
        return self.identity


class Store:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        if "://" not in url:  # a local path: make the URLs in reports absolute
            url = str(Path(url).expanduser().resolve())
        self.url = url.rstrip("/")
        self.storage_options = storage_options or {}
        self.opened = uuid.uuid4().hex  # this Store and its copies sent to workers share listings (`_listing`)
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

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def in_memory(self) -> bool:
        """memory://: held by this process alone, so a helper process's writes would be lost."""
        return isinstance(self.fs, MemoryFileSystem)

    def abs(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def url_of(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    # --- objects -------------------------------------------------------------------------------
    @staticmethod
    def object_path(kind: str, key: str, ext: str) -> str:
        return f"objects/{kind}/{key[:2]}/{key}.{ext}"

    def put(self, kind: str, key: str, data: bytes, ext: str) -> ObjectRef:
        written = self.write_object(kind, key, data, ext)
        self.remember([written])
        return written[0]

    def write_object(self, kind: str, key: str, data: bytes, ext: str) -> tuple[ObjectRef, str | None]:
        """Store an object, and say which version of its file was written (`digests.version`), but
        leave it to `remember` to enter it as known-good: a helper process hands that to the run's."""
        path = self.object_path(kind, key, ext)
        data = seal(data, ext, key)
        digest = sha256_bytes(data)
        self.write_atomic(path, data)
        self.write_atomic(path + ".sha256", digest.encode())  # last: marks the object present
        where = self.abs(path)
        info = (listing.details_of(self.fs, [where]) or {}).get(where) or self.fs.info(where)
        return ObjectRef(path=path, key=key, sha256=digest), version(info)

    def remember(self, written: list[tuple[ObjectRef, str | None]]) -> None:
        """Enter objects this machine wrote (`write_object`), in the versions written, as
        known-good: a later check of those versions does not read them back."""
        for ref, listed in written:
            digests().put(stamp_of(self.url_of(ref.path), listed), ref.sha256)
            kind = ref.path.split("/")[1]
            if kind in self._listings:
                self._listings[kind][ref.path] = listed or ""

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

    def find_many(self, kind: str, keys: list[str], ext: str) -> dict[str, ObjectRef]:
        """{key: stored, intact object} for those of `keys` that have one.

        Looked up in one listing of the kind, not one request per key: an object whose stamp was
        verified before (or that this machine wrote) is not read; any other is read and checked.
        Keys the listing lacks (not those it has, corrupt) are looked for once more in a fresh
        listing: another run may have stored them since.
        """
        wanted = {self.object_path(kind, key, ext): None for key in keys}
        found = self._intact(kind, wanted, fresh=False)
        missing = {path: None for path in wanted if path not in self._listings[kind]}  # unlisted, not corrupt
        if missing:
            found.update(self._intact_since(kind, missing))
        return {ref.key: ref for ref in found.values()}

    def broken(self, refs: list[ObjectRef]) -> list[ObjectRef]:
        """The refs whose object is missing, does not match its checksum or was made for another key.

        Checked against one listing per object kind (taken once per run and process, then reused);
        an object is read and re-hashed only if this version of it (its stamp) was never verified on
        this machine. An object the listing lacks is looked for in a fresh listing before it counts
        as missing.
        """
        bad, by_kind = [], {}
        for ref in refs:
            kind, ext = ref.path.split("/")[1], ref.path.rsplit(".", 1)[-1]
            if ref.path != self.object_path(kind, ref.key, ext):
                bad.append(ref)  # a ref whose path is another key's: never intact
            else:
                by_kind.setdefault(kind, {})[ref.path] = ref.sha256
        for kind, wanted in by_kind.items():
            whole = self._set_stamp(kind, wanted)
            if whole and digests().get(whole):
                continue  # these objects, in these very versions, were all found intact before
            intact = self._intact(kind, wanted, fresh=False)
            missing = {path: sha for path, sha in wanted.items() if path not in self._listings[kind]}
            if missing:
                intact.update(self._intact_since(kind, missing))
            bad += [ref for ref in refs if ref.path in wanted and ref.path not in intact]
            if whole and len(intact) == len(wanted):
                digests().put(whole, whole.rsplit(":", 1)[-1])
        return bad

    def vouch_for(self, refs: list[ObjectRef]) -> None:
        """Check the objects a task hands on as the next run's check of its record will (entering
        their set's stamp, so that check is one lookup), and fail if one is not intact."""
        bad = self.broken(refs)
        if bad:
            raise StoreError(f"store: {self.url_of(bad[0].path)} is missing or corrupt right after this run stored it")

    def _set_stamp(self, kind: str, wanted: dict[str, str]) -> str | None:
        """A stamp for a whole set of objects of `kind` in their listed versions with the checksums
        a manifest expects (None if any is unlisted or the filesystem gives no version). Once every
        object of the set was found intact, a later check of the same set in the same versions (a
        shard's record in a no-op run) is one lookup, not one per object."""
        listed = self._versions(kind, list(wanted))
        versions = [listed.get(path) for path in wanted]
        if not all(versions) or not all(wanted.values()):
            return None
        h = hashlib.sha256()
        for column in (wanted, wanted.values(), versions):  # paths, checksums, versions: one line each
            h.update("\n".join(column).encode() + b"\0")
        return f"{self.url}|set:{h.hexdigest()}"

    def _versions(self, kind: str, paths: list[str]) -> dict[str, str]:
        """{path: version} of those of `paths` that are whole objects. On a local disk each is
        looked at (`lstat`, object and checksum file): a no-op run checks its shards without
        listing, and holding, every object of the kind. Elsewhere, from the kind's listing."""
        if kind in self._listings:
            return self._listings[kind]
        versions = {}
        for path in paths:  # one at a time: a shard's thousands of files' details are never all held
            found = listing.details_of(self.fs, [self.abs(path), self.abs(path + ".sha256")])
            if found is None:  # not a local disk
                return self._listing(kind, fresh=False)
            if len(found) == 2:
                versions[path] = version(found[self.abs(path)]) or ""
        return versions

    def _intact(self, kind: str, wanted: dict[str, str | None], fresh: bool) -> dict[str, ObjectRef]:
        """{path: ref} for the object paths in `wanted` that the kind's listing (`fresh`: listed
        anew) holds, whole and intact. `wanted` maps a path to the sha256 it must have (a
        manifest's ref), or to None: then its checksum file says."""
        listing = self._listing(kind, fresh)
        stamps = {path: f"{self.url_of(path)}|{listing[path]}" if listing[path] else None
                  for path in wanted if path in listing}  # None: the filesystem gives no version, read it
        known = digests().get_many(list(stamps.values()))
        intact, verified = {}, []
        for path, stamp in stamps.items():
            key, want = path.rsplit("/", 1)[-1].rsplit(".", 1)[0], wanted[path]
            if stamp in known and want in (None, known[stamp]):
                intact[path] = ObjectRef(path=path, key=key, sha256=known[stamp])
                continue
            try:
                sha = want or self.fs.cat_file(self.abs(path + ".sha256")).decode().strip()
                intact[path] = ObjectRef(path=path, key=key, sha256=sha)
                self.read(intact[path])
                verified.append((stamp, sha))
            except (FileNotFoundError, ArtifactMissing, UnicodeDecodeError):
                intact.pop(path, None)
        digests().put_many(verified)
        return intact

    def _intact_since(self, kind: str, missing: dict[str, str | None]) -> dict[str, ObjectRef]:
        """`_intact` for paths the kind's listing lacks, which another run may have stored since it
        was taken: on a local disk each is looked at (object and checksum file, added to the
        listing when both are there); elsewhere the kind is listed anew."""
        paths = [self.abs(path) for path in missing] + [self.abs(path + ".sha256") for path in missing]
        found = listing.details_of(self.fs, paths)
        if found is None:
            return self._intact(kind, missing, fresh=True)
        listed = self._listings[kind]
        for path in missing:
            if self.abs(path) in found and self.abs(path + ".sha256") in found:
                listed[path] = version(found[self.abs(path)]) or ""
        return self._intact(kind, missing, fresh=False)

    def _listing(self, kind: str, fresh: bool) -> dict[str, str]:
        """{object path: its version (size + ETag or mtime, see `digests.version`; "" where the
        filesystem gives none)} for every whole object under `objects/<kind>` (checksum file
        present), listed once per run (`_listings`) unless `fresh`. Temporary files of killed
        writes found on the way are swept."""
        with _kind_lock(self.url, kind):  # the shards in this process's threads list a kind once
            if fresh or kind not in self._listings:
                self.fs.invalidate_cache(self.abs(f"objects/{kind}"))  # other runs may have written since
                skip = len(self.fs._strip_protocol(self.root)) + 1
                versions, checksummed, partial = {}, set(), {}
                for path, info in listing.find(self.fs, self.abs(f"objects/{kind}")):  # one file at a time
                    rel = self.fs._strip_protocol(path)[skip:]
                    if PARTIAL in rel.rsplit("/", 1)[-1]:
                        partial[path] = info
                    elif rel.endswith(".sha256"):
                        checksummed.add(rel.removesuffix(".sha256"))
                    else:
                        versions[rel] = version(info) or ""
                self.sweep_partial(partial)
                self._listings[kind] = {path: v for path, v in versions.items() if path in checksummed}
            return self._listings[kind]

    @property
    def _listings(self) -> dict[str, dict[str, str]]:
        """{object kind: its listing}, shared by this Store and every copy of it in this process:
        a Dask worker running many shards of one run lists each kind once. Listings of earlier
        runs on the same store are dropped."""
        with _LISTINGS_LOCK:
            if (self.url, self.opened) not in _LISTINGS:
                for stale in [k for k in _LISTINGS if k[0] == self.url]:
                    del _LISTINGS[stale]
                _LISTINGS[self.url, self.opened] = {}
            return _LISTINGS[self.url, self.opened]

    def forget_listings(self) -> None:
        """Drop this run's listings (a kind used again is listed anew): the latents' listing holds
        a path and a version per image, which training has no use for."""
        with _LISTINGS_LOCK:
            _LISTINGS.pop((self.url, self.opened), None)

    def put_list(self, items: list) -> ListRef:
        """Store a long list (pydantic models or plain JSON values) as one sealed JSON object and
        return the reference tasks are handed instead of the list. The object is named by its
        bytes; an identical one already stored and verified on this machine is not written again."""
        return self.put_named(list_bytes(items), count=len(items), identity=content_key("list", items))

    def put_named(self, data: bytes, count: int, identity: str, ext: str = "json") -> ListRef:
        """Store `data` (`count` items whose content is `identity`, as JSON or as a safetensors
        table) as one object named by its bytes, unless an identical one is stored and verified on
        this machine."""
        key = sha256_bytes(data)
        ref = self.find_many("lists", [key], ext).get(key) or self.put("lists", key, data, ext)
        return ListRef(ref=ref, count=count, identity=identity)

    def read_list(self, listed: ListRef, item_type: type | None = None) -> list:
        """The items of a stored list, checked like every read; `item_type` validates each one."""
        items = self.read_json(listed.ref)
        return [item_type.model_validate(i) for i in items] if item_type else items

    def put_json(self, kind: str, key: str, value: Any) -> ObjectRef:
        return self.put(kind, key, json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode(), "json")

    def read_json(self, ref: ObjectRef) -> Any:
        return json.loads(unsealed_json(self.read(ref)))

    def put_tensors(self, kind: str, key: str, tensors: dict[str, torch.Tensor],
                    metadata: dict[str, str] | None = None) -> ObjectRef:
        return self.put(kind, key, tensor_bytes(tensors, metadata), "safetensors")

    def write_tensors(self, kind: str, key: str, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> tuple[ObjectRef, str | None]:
        """`put_tensors`, but to `remember` later (`write_object`)."""
        return self.write_object(kind, key, tensor_bytes(tensors, metadata), "safetensors")

    def read_tensors(self, ref: ObjectRef) -> dict[str, torch.Tensor]:
        return load_safetensors(self.read(ref))

    # --- plain files ---------------------------------------------------------------------------
    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write `rel` whole or not at all. A failed write (a full disk, a lost connection, a
        signal) removes its temporary file and raises `StoreError` naming the object."""
        final = self.abs(rel)
        tmp = f"{final}{PARTIAL}{os.urandom(6).hex()}"
        try:
            if self.is_local:  # the same steps as fsspec's, without its layers
                try:
                    out = open(tmp, "wb")
                except FileNotFoundError:  # the object's folder is new
                    os.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
                    out = open(tmp, "wb")
                with out:
                    out.write(data)
                os.replace(tmp, final)
            else:
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


_LISTINGS: dict[tuple[str, str], dict[str, dict[str, str]]] = {}  # (store URL, Store.opened) -> listings
_LISTINGS_LOCK = threading.Lock()
_KIND_LOCKS: dict[tuple[str, str], threading.Lock] = {}


def _kind_lock(url: str, kind: str) -> threading.Lock:
    with _LISTINGS_LOCK:
        return _KIND_LOCKS.setdefault((url, kind), threading.Lock())


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


def list_bytes(items: list) -> bytes:
    """Compact JSON of a list of plain values or of pydantic models of one type (serialized by
    pydantic's own encoder: the same bytes as `json.dumps` of each `model_dump`, 4x faster)."""
    if items and isinstance(items[0], BaseModel):
        return _list_adapter(type(items[0])).dump_json(items)
    return json.dumps(items, separators=(",", ":"), ensure_ascii=False).encode()


@functools.cache
def _list_adapter(item_type: type) -> TypeAdapter:
    return TypeAdapter(list[item_type])


def _modified(info: dict) -> float:
    """Seconds since the epoch at which a listed file last changed (local `mtime`, S3 `LastModified`)."""
    stamp = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if stamp is None:
        return time.time()  # unknown: never old enough to sweep
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)


# Dtypes numpy has: their tensors serialize through safetensors' numpy front end, which gives the
# same bytes as its torch one with a quarter of the Python work (it matters at one latent per image).
NUMPY_DTYPES = {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
                torch.uint8, torch.bool}


def tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """`tensors` as a safetensors file."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if all(v.dtype in NUMPY_DTYPES for v in tensors.values()):
        return save_numpy({k: v.numpy() for k, v in tensors.items()}, metadata=metadata)
    return save_safetensors(tensors, metadata=metadata)  # bfloat16, float8: no numpy dtype


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The string metadata in a safetensors file's header."""
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len]).get("__metadata__", {})

