"""`edge-agent fleet keygen`: an ed25519 signing key for desired documents (docs/fleet.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edge_agent.agent.signing import encode_public_key, new_private_key, private_key_pem
from edge_agent.fleet.connection import FleetError

KEY_FILE = "fleet-signing.pem"


def run(args: Any) -> int:
    out: Path = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FleetError(f"--out {out}: cannot create the directory ({exc.strerror})") from None
    path = out / KEY_FILE
    key = new_private_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise FleetError(f"{path} exists: not overwritten (a node pinning its public key would refuse documents "
                         "signed by a new one); remove it first or choose another --out") from None
    except OSError as exc:
        raise FleetError(f"{path}: cannot create it ({exc.strerror})") from None
    with os.fdopen(fd, "wb") as f:
        f.write(private_key_pem(key))
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o600)  # whatever the umask
    print(encode_public_key(key.public_key()))
    print(f"# wrote {path} (mode 0600). List the public key above in each node's fleet.trusted_keys, and push with "
          f"--sign-key {path}")
    return 0
