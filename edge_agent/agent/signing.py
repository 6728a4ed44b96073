"""ed25519 signatures of desired documents (docs/fleet.md): what is signed, signing, and verifying against
the public keys a node pins in `fleet.trusted_keys`.

The signed bytes are the canonical JSON of the document without its `signature`: keys sorted, no
whitespace, UTF-8. Keys travel as base64 of the raw 32 bytes; private keys are PKCS#8 PEM files.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.errors import EdgeAsdError

# `cryptography` (about 8 MB of resident memory) is imported only where a key is used: a node that pins no
# keys never loads it.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class SignatureError(EdgeAsdError):
    pass


def signed_bytes(document: dict[str, Any]) -> bytes:
    unsigned = {k: v for k, v in document.items() if k != "signature"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def sign(document: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """The document with its `signature` set."""
    signature = base64.b64encode(key.sign(signed_bytes(document))).decode("ascii")
    return {**{k: v for k, v in document.items() if k != "signature"}, "signature": signature}


def verify(document: dict[str, Any], trusted_keys: list[str]) -> int:
    """The index in `trusted_keys` of the key that signed `document`; SignatureError when none did."""
    given = document.get("signature")
    if not isinstance(given, str) or not given:
        raise SignatureError("the document is not signed, and this node accepts only documents signed by one "
                             "of its fleet.trusted_keys")
    try:
        signature = base64.b64decode(given, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("signature: not base64") from None
    from cryptography.exceptions import InvalidSignature

    message = signed_bytes(document)
    for i, encoded in enumerate(trusted_keys):
        try:
            public_key(encoded).verify(signature, message)
            return i
        except InvalidSignature:
            continue
    raise SignatureError("signature: not made by any of this node's fleet.trusted_keys over this document")


def public_key(encoded: str) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(base64.b64decode(encoded, validate=True))


def encode_public_key(key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def new_private_key() -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an ed25519 key ({type(key).__name__})")
    return key
