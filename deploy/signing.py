"""Ed25519 keys and manifest signatures (cryptography).

Key files: ``PREFIX.key`` is the private key (PEM PKCS8, unencrypted), created 0600 with O_EXCL so it
is never group/world-readable even for an instant, and never overwritten; ``PREFIX.pub`` is the
public key (PEM SubjectPublicKeyInfo, 0644) that devices list in ``trusted_keys``.

A signature is the JSON object ``{"algorithm": "ed25519", "key_id": "<16 hex>", "signature": "<base64>"}``
over the exact manifest.json bytes. The key id is the first 16 hex digits of sha256 of the raw
32-byte public key: a name for messages, never trusted on its own (verification is always
cryptographic against the device's trusted keys).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from deploy.manifest import BundleError

__all__ = [
    "BundleError",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "sign_manifest",
    "verify_signature",
]

ALGORITHM = "ed25519"


def _key_paths(prefix: Path) -> tuple[Path, Path]:
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively with ``mode`` (never wider, whatever the umask) and write ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_keypair(prefix: Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair to PREFIX.key (0600) and PREFIX.pub (0644); return both paths.

    Refuses (BundleError "... exists") when either file exists. A missing parent folder is created 0700.
    """
    if Path(prefix).suffix in (".key", ".pub"):
        raise BundleError(
            f"key prefix {prefix} ends in {Path(prefix).suffix}: give the prefix alone (PREFIX.key and "
            "PREFIX.pub are written)"
        )
    key_path, pub_path = _key_paths(prefix)
    for path in (key_path, pub_path):
        if os.path.lexists(path):
            raise BundleError(f"{path} exists: refusing to overwrite a key (choose another --out prefix)")
    try:
        key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(f"cannot create key folder {key_path.parent}: {exc.strerror or exc}") from None
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        _write_new(key_path, private_pem, 0o600)
    except FileExistsError:
        raise BundleError(f"{key_path} exists: refusing to overwrite a key (choose another --out prefix)") from None
    except OSError as exc:
        raise BundleError(f"cannot write {key_path}: {exc.strerror or exc}") from None
    try:
        _write_new(pub_path, public_pem, 0o644)
    except OSError as exc:
        with contextlib.suppress(OSError):
            key_path.unlink()
        if isinstance(exc, FileExistsError):
            raise BundleError(f"{pub_path} exists: refusing to overwrite a key (choose another --out prefix)") from None
        raise BundleError(f"cannot write {pub_path}: {exc.strerror or exc}") from None
    return key_path, pub_path


def _read_key_file(path: Path, what: str) -> tuple[bytes, os.stat_result]:
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{what} {path} is not a regular file")
        return path.read_bytes(), st
    except FileNotFoundError:
        raise BundleError(f"{what} {path} not found") from None
    except OSError as exc:
        raise BundleError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (PEM). Refuses a file readable by group or others (say chmod 600)."""
    path = Path(path)
    data, st = _read_key_file(path, "private key")
    if b"PUBLIC KEY" in data and b"PRIVATE KEY" not in data:
        raise BundleError(f"{path} is a public key; signing needs the private key (the .key file)")
    if os.name == "posix" and st.st_mode & 0o077:
        raise BundleError(
            f"private key {path} is readable or writable by group/others (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"run chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise BundleError(f"private key {path} is password-protected; edge-deploy uses unencrypted keys") from None
    except (ValueError, UnsupportedAlgorithm):
        raise BundleError(f"{path} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"private key {path} is not an Ed25519 key (it is {type(key).__name__})")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key (PEM SubjectPublicKeyInfo)."""
    path = Path(path)
    data, _ = _read_key_file(path, "public key")
    if b"PRIVATE KEY" in data:
        raise BundleError(f"{path} is a private key; trusted keys are public keys (the .pub file)")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise BundleError(f"{path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"public key {path} is not an Ed25519 key (it is {type(key).__name__})")
    return key


def key_id(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """First 16 hex digits of sha256 of the raw 32-byte public key (a private key: of its public half)."""
    if isinstance(public_key, Ed25519PrivateKey):
        public_key = public_key.public_key()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_manifest(manifest_bytes: bytes, private_key: Ed25519PrivateKey) -> dict[str, str]:
    """The signature object over ``manifest_bytes``."""
    return {
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key),
        "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode("ascii"),
    }


def verify_signature(manifest_bytes: bytes, signature: Any, trusted: Sequence[Ed25519PublicKey]) -> str:
    """Check ``signature`` over ``manifest_bytes`` against the trusted keys; return the verifying key's id.

    BundleError: malformed signature object; "signed by an untrusted key <id>" when the signature names
    no trusted key; "signature does not verify: manifest changed or wrong key" when it does not verify.
    """
    if not trusted:
        raise BundleError("no trusted keys given: cannot check the signature")
    if not isinstance(signature, dict):
        raise BundleError("signature is malformed: not a JSON object")
    algorithm = signature.get("algorithm")
    if algorithm != ALGORITHM:
        raise BundleError(f"signature algorithm {algorithm!r} is not supported (only {ALGORITHM})")
    claimed = signature.get("key_id")
    encoded = signature.get("signature")
    if not isinstance(claimed, str) or not isinstance(encoded, str):
        raise BundleError("signature is malformed: key_id and signature must be strings")
    if re.fullmatch(r"[0-9a-f]{16}", claimed) is None:
        raise BundleError("signature is malformed: key_id must be 16 lower-case hex digits")
    try:
        raw = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise BundleError("signature is malformed: not base64") from None
    if len(raw) != 64:
        raise BundleError(f"signature is malformed: {len(raw)} bytes, an Ed25519 signature has 64")
    by_id = {key_id(k): k for k in trusted}
    key = by_id.get(claimed)
    if key is None:
        known = ", ".join(sorted(by_id))
        raise BundleError(f"signed by an untrusted key {claimed} (trusted: {known})")
    try:
        key.verify(raw, manifest_bytes)
    except InvalidSignature:
        raise BundleError(
            f"signature does not verify: manifest changed or wrong key (signature claims key {claimed})"
        ) from None
    return claimed
