"""Manifest signing: an HMAC-SHA256 over the canonical manifest, and the bundle key it is made with.

A build signs with `--sign-key-file` (`sign_manifest`); a load given a key (`key=`, `--bundle-key-file`, or the
`CATRT_BUNDLE_KEY` environment variable read by `resolve_key`) refuses an unsigned or wrongly signed bundle
(`signature_problems`, one of `catrt.integrity.check_integrity`'s checks). A key is what makes a manifest edited
together with its files (or its seal) detectable: the other checks compare the files with the manifest as it is now.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from typing import Any

from catrt.errors import CatrtError, ConfigError, CorruptBundleError
from catrt.key_files import read_key_variable
from catrt.manifest import MANIFEST_FILE, SIGNATURE_FIELD

#: The bundle key (the key itself, not a file) used when none is passed.
BUNDLE_KEY_ENV = "CATRT_BUNDLE_KEY"


def canonical_manifest(data: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the manifest without its signature, as sorted-keys compact JSON."""
    payload = {name: value for name, value in data.items() if name != SIGNATURE_FIELD}
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def sign_manifest(data: Mapping[str, Any], key: bytes) -> str:
    """HMAC-SHA256 (hex) of the canonical manifest under `key`."""
    return hmac.new(_checked_key(key), canonical_manifest(data), hashlib.sha256).hexdigest()


def signature_problems(data: Mapping[str, Any], key: bytes) -> list[CatrtError]:
    """[] when the manifest carries the signature `key` makes of it; else why not, naming `signature`."""
    found = data.get(SIGNATURE_FIELD)
    if found is None:
        return [CorruptBundleError(
            f"{MANIFEST_FILE} is not signed, but a bundle key was given (--bundle-key-file, {BUNDLE_KEY_ENV} or "
            f"load(key=...)): refusing an unsigned bundle; build it with --sign-key-file",
            field=SIGNATURE_FIELD,
        )]
    expected = sign_manifest(data, key).encode("ascii")
    if not hmac.compare_digest(expected, str(found).encode("utf-8", "replace")):
        return [CorruptBundleError(
            f"{MANIFEST_FILE} signature does not match the bundle key: the manifest was changed after signing, or "
            f"signed with another key; refusing the bundle",
            field=SIGNATURE_FIELD,
        )]
    return []


def resolve_key(key: bytes | str | None, environ: Mapping[str, str] = os.environ) -> bytes | None:
    """`key` as bytes, else `$CATRT_BUNDLE_KEY` (surrounding whitespace dropped; set but blank is refused),
    else None (no check)."""
    if key is None:
        text = read_key_variable(environ, BUNDLE_KEY_ENV, "key", "the key the bundle was signed with", "load without a signature check")
        return None if text is None else text.encode("utf-8")
    return _checked_key(key)


def _checked_key(key: bytes | str) -> bytes:
    """The key without surrounding whitespace, as a key file and `$CATRT_BUNDLE_KEY` are read, so a key passed as its
    file's bytes (newline included) is the key that file signs and checks with."""
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, (bytes, bytearray)):
        raise ConfigError(f"a bundle key must be bytes, got {type(key).__name__}", field="key")
    key = bytes(key).strip()
    if not key:
        raise ConfigError("a bundle key must not be empty", field="key")
    return key
