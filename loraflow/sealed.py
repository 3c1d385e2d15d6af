"""Sealed objects: every stored object carries the content key it was made for, in its own format.

A checksum says the bytes are whole; only the key inside them says they are the object asked for,
so an object copied under another key's name (checksum file included) is a miss, not a hit.

- safetensors: `"loraflow.key"` in the header's `__metadata__`. The header is rewritten as
  canonical JSON (sorted keys, no spaces, space-padded to 8 bytes as safetensors pads it):
  safetensors writes metadata in hash-map order, which differs between processes, and the same
  inputs must give the same bytes everywhere. Tensor data offsets are relative to the end of the
  header, so the data bytes stay as they are.
- PNG: a `tEXt` chunk `loraflow-key` right after `IHDR`; the pixels are not re-encoded.
- JSON (stored lists, `loraflow.manifests.ManifestRef`): the value wrapped as
  `{"loraflow.key":"<key>","items":<value>}`, so the key is read from the first bytes alone.

Reading parses only the safetensors JSON header or the PNG chunk layout; nothing is unpickled.
"""

from __future__ import annotations

import json
import zlib

KEY_FIELD = "loraflow.key"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_KEYWORD = b"loraflow-key"
JSON_PREFIX = b'{"' + KEY_FIELD.encode() + b'":"'
JSON_ITEMS = b'","items":'
IHDR_END = len(PNG_SIGNATURE) + 8 + 13 + 4  # length, type, 13 bytes of IHDR data, CRC


def seal(data: bytes, ext: str, key: str) -> bytes:
    """`data` with `key` embedded (and, for safetensors, its header made canonical)."""
    if ext == "safetensors":
        header, body = _safetensors_header(data)
        header["__metadata__"] = {**header.get("__metadata__", {}), KEY_FIELD: key}
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text + body
    if ext == "png":
        if data[: len(PNG_SIGNATURE)] != PNG_SIGNATURE or data[12:16] != b"IHDR":
            raise ValueError("not a PNG")
        return data[:IHDR_END] + _png_chunk(b"tEXt", PNG_KEYWORD + b"\0" + key.encode("ascii")) + data[IHDR_END:]
    if ext == "json":
        return JSON_PREFIX + key.encode("ascii") + JSON_ITEMS + data + b"}"
    raise ValueError(f"cannot seal a .{ext} object: only safetensors, png and json carry their key")


def sealed_key(data: bytes, ext: str) -> str | None:
    """The key `data` was sealed with, or None if it carries none (or is not a readable file)."""
    try:
        if ext == "safetensors":
            key = _safetensors_header(data)[0].get("__metadata__", {}).get(KEY_FIELD)
            return key if isinstance(key, str) else None
        if ext == "png" and data.startswith(PNG_SIGNATURE):  # the chunk seal() put right after IHDR
            length = int.from_bytes(data[IHDR_END : IHDR_END + 4], "big")
            chunk = data[IHDR_END : IHDR_END + 12 + length]
            payload = chunk[8:-4]
            if chunk == _png_chunk(b"tEXt", payload) and payload.startswith(PNG_KEYWORD + b"\0"):
                return payload[len(PNG_KEYWORD) + 1 :].decode("ascii")
        if ext == "json" and data.startswith(JSON_PREFIX) and data.endswith(b"}"):
            end = data.find(b'"', len(JSON_PREFIX))
            if data.startswith(JSON_ITEMS, end):
                return data[len(JSON_PREFIX) : end].decode("ascii")
    except Exception:  # whatever is wrong with the bytes, they carry no key we can trust
        return None
    return None


def unsealed_json(data: bytes) -> bytes:
    """The JSON value inside a sealed JSON object (whose key was checked with `sealed_key`)."""
    start = data.index(JSON_ITEMS) + len(JSON_ITEMS)
    return data[start:-1]


def _safetensors_header(data: bytes) -> tuple[dict, bytes]:
    """The parsed JSON header and the tensor data after it."""
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("truncated safetensors header")
    header = json.loads(data[8 : 8 + size])
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise ValueError("not a safetensors header")
    return header, data[8 + size :]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")
