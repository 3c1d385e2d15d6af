"""Content hashing: the one way loraflow turns values into keys.

`content_key(*parts)` is a sha256 over a canonical JSON form of its arguments. Pydantic models
contribute their fields (recursively), or only what their `cache_token()` returns (an `ObjectRef`
contributes its content key, not its location), so two equal inputs give the same key on any
machine, in any process, under any module name.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel


def canonical(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, BaseModel):
        token = getattr(value, "cache_token", None)
        if token:
            return canonical(token())
        return {name: canonical(getattr(value, name)) for name in sorted(type(value).model_fields)}
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    raise TypeError(f"cannot content-hash a {type(value).__name__}; pass a small descriptor instead")


def content_key(*parts: Any) -> str:
    blob = json.dumps(canonical(list(parts)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
