"""Signed messages between agents: an HMAC-SHA256 of what a message says, under the
installation's message key.

Messages are rows of the store, so anyone who can write to the database could otherwise slip
an agent a `retrain` or a forged `window`. The key lives outside the database (a file only its
user can read, `Settings.message_key_file`, shipped to Ray actors with their arguments): a row
written without it does not verify, and the receiving agent dead-letters it as
`message_rejected` instead of acting on it. What is signed is everything the receiver acts on:
key, sender, recipient, kind, payload and the sender's identity (`by`), as canonical JSON.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_VERSION = "v1"


def _canonical(key: str, sender: str, recipient: str, kind: str, payload: dict[str, Any],
               by: str | None) -> bytes:
    return json.dumps([key, sender, recipient, kind, payload, by], sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


@dataclass(frozen=True, repr=False)
class MessageSigner:
    """Signs and checks messages under one key (never shown in its repr)."""

    key: bytes

    def sign(self, key: str, sender: str, recipient: str, kind: str, payload: dict[str, Any],
             by: str | None) -> str:
        mac = hmac.new(self.key, _canonical(key, sender, recipient, kind, payload, by), hashlib.sha256)
        return f"{_VERSION}:{mac.hexdigest()}"

    def verify(self, signature: str | None, key: str, sender: str, recipient: str, kind: str,
               payload: dict[str, Any], by: str | None) -> bool:
        if not signature:
            return False
        try:
            want = self.sign(key, sender, recipient, kind, payload, by)
        except (TypeError, ValueError):  # a payload no signer could have produced
            return False
        return hmac.compare_digest(signature.encode(), want.encode())

    def __repr__(self) -> str:
        return "MessageSigner(key=<hidden>)"


def load_or_create_key(path: Path) -> bytes:
    """The installation's message key at `path`, made (256 random bits, mode 0600) if missing.
    Two processes making it at once agree: the first link wins and both read it back."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    try:
        os.link(tmp, path)  # fails if another process made it first: keep theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return bytes.fromhex(path.read_text().strip())
