"""Ed25519 keys and signatures: file modes, no overwrites, clear refusals (real cryptography, real files)."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from deploy.bundle import BundleError
from deploy.signing import (
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_signature,
)

MANIFEST = b'{"schema_version":1,"model":{"name":"ae"}}'


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_keygen_modes_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        key_path, pub_path = generate_keypair(tmp_path / "keys" / "line3")
    finally:
        os.umask(old)
    assert key_path == tmp_path / "keys" / "line3.key" and pub_path == tmp_path / "keys" / "line3.pub"
    assert _mode(key_path) == 0o600
    assert _mode(pub_path) == 0o644
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    private, public = load_private_key(key_path), load_public_key(pub_path)
    assert key_id(private) == key_id(public)


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    key_path, pub_path = generate_keypair(tmp_path / "k")
    before = key_path.read_bytes(), pub_path.read_bytes()
    with pytest.raises(BundleError, match=r"k\.key exists: refusing to overwrite a key"):
        generate_keypair(tmp_path / "k")
    assert (key_path.read_bytes(), pub_path.read_bytes()) == before
    # a lone .pub also blocks, and no .key is left behind
    (tmp_path / "lone.pub").write_text("someone else's key")
    with pytest.raises(BundleError, match=r"lone\.pub exists: refusing to overwrite a key"):
        generate_keypair(tmp_path / "lone")
    assert not (tmp_path / "lone.key").exists()
    with pytest.raises(BundleError, match=r"ends in \.key: give the prefix alone"):
        generate_keypair(tmp_path / "k2.key")
    assert not (tmp_path / "k2.key.key").exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_group_or_world_readable_private_key_refused(tmp_path: Path, mode: int) -> None:
    key_path, _ = generate_keypair(tmp_path / "k")
    os.chmod(key_path, mode)
    with pytest.raises(BundleError, match=rf"readable or writable by group/others \(mode {mode:04o}\): run chmod 600"):
        load_private_key(key_path)
    os.chmod(key_path, 0o600)
    load_private_key(key_path)
    os.chmod(key_path, 0o400)
    load_private_key(key_path)


def test_key_loading_refusals(tmp_path: Path) -> None:
    key_path, pub_path = generate_keypair(tmp_path / "k")
    with pytest.raises(BundleError, match=r"private key .*absent\.key not found"):
        load_private_key(tmp_path / "absent.key")
    with pytest.raises(BundleError, match=r"public key .*absent\.pub not found"):
        load_public_key(tmp_path / "absent.pub")
    with pytest.raises(BundleError, match=r"is not a regular file"):
        load_public_key(tmp_path)
    # the two halves swapped
    pub_as_key = tmp_path / "pub_as.key"
    pub_as_key.write_bytes(pub_path.read_bytes())
    os.chmod(pub_as_key, 0o600)
    with pytest.raises(BundleError, match="is a public key; signing needs the private key"):
        load_private_key(pub_as_key)
    with pytest.raises(BundleError, match="is a private key; trusted keys are public keys"):
        load_public_key(key_path)
    # garbage
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"not a key at all")
    os.chmod(junk, 0o600)
    with pytest.raises(BundleError, match="is not a PEM private key"):
        load_private_key(junk)
    with pytest.raises(BundleError, match="is not a PEM public key"):
        load_public_key(junk)
    # a real key of the wrong type
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_priv = tmp_path / "ec.key"
    ec_priv.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    os.chmod(ec_priv, 0o600)
    ec_pub = tmp_path / "ec.pub"
    ec_pub.write_bytes(
        ec_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(BundleError, match="is not an Ed25519 key"):
        load_private_key(ec_priv)
    with pytest.raises(BundleError, match="is not an Ed25519 key"):
        load_public_key(ec_pub)
    # password-protected
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        load_private_key(key_path).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    os.chmod(locked, 0o600)
    with pytest.raises(BundleError, match="is password-protected"):
        load_private_key(locked)


def test_key_id(tmp_path: Path) -> None:
    _, pub_path = generate_keypair(tmp_path / "k")
    public = load_public_key(pub_path)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(raw) == 32
    assert key_id(public) == hashlib.sha256(raw).hexdigest()[:16]
    _, other_pub = generate_keypair(tmp_path / "other")
    assert key_id(load_public_key(other_pub)) != key_id(public)


def test_sign_and_verify(tmp_path: Path) -> None:
    key_path, pub_path = generate_keypair(tmp_path / "a")
    _, other_pub = generate_keypair(tmp_path / "b")
    private, public, other = load_private_key(key_path), load_public_key(pub_path), load_public_key(other_pub)
    signature = sign_manifest(MANIFEST, private)
    assert set(signature) == {"algorithm", "key_id", "signature"}
    assert signature["algorithm"] == "ed25519" and signature["key_id"] == key_id(public)
    assert len(base64.b64decode(signature["signature"])) == 64
    assert verify_signature(MANIFEST, signature, [public]) == key_id(public)
    assert verify_signature(MANIFEST, signature, [other, public]) == key_id(public)

    with pytest.raises(BundleError, match=rf"signed by an untrusted key {key_id(public)} \(trusted: {key_id(other)}\)"):
        verify_signature(MANIFEST, signature, [other])
    with pytest.raises(BundleError, match="signature does not verify: manifest changed or wrong key"):
        verify_signature(MANIFEST.replace(b"ae", b"xx"), signature, [public])
    # a signature that claims a trusted key id but was made by another key
    _, forged_pub = generate_keypair(tmp_path / "c")
    forged = sign_manifest(MANIFEST, load_private_key(tmp_path / "c.key"))
    forged["key_id"] = key_id(public)
    with pytest.raises(BundleError, match="signature does not verify"):
        verify_signature(MANIFEST, forged, [public])
    with pytest.raises(BundleError, match="no trusted keys given"):
        verify_signature(MANIFEST, signature, [])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: "not an object", "not a JSON object"),
        (lambda s: {**s, "algorithm": "rsa"}, "signature algorithm 'rsa' is not supported"),
        (lambda s: {**s, "signature": "@@not base64@@"}, "not base64"),
        (lambda s: {**s, "signature": base64.b64encode(b"short").decode()}, "5 bytes, an Ed25519 signature has 64"),
        (lambda s: {**s, "key_id": "x\nforged line"}, "key_id must be 16 lower-case hex digits"),
        (lambda s: {k: v for k, v in s.items() if k != "signature"}, "must be strings"),
    ],
)
def test_malformed_signatures(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    key_path, pub_path = generate_keypair(tmp_path / "a")
    signature = sign_manifest(MANIFEST, load_private_key(key_path))
    with pytest.raises(BundleError, match=message):
        verify_signature(MANIFEST, mutate(signature), [load_public_key(pub_path)])
