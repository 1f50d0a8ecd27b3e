"""edge_daemon.model.load_bundle on a real signed bundle tar: its unpacked copy is durable and self-healing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import edge_daemon.model
from deploy.bundle import pack_tar, sign_bundle
from deploy.manifest import BundleError, sha256_file
from deploy.signing import generate_keypair
from edge_daemon.model import load_bundle
from tests.bundle_factory import watch_unpacking
from tests.conftest import SignedBundle


@pytest.fixture()
def bundle_tar(signed_bottle_bundle: SignedBundle, tmp_path: Path) -> Path:
    tar = tmp_path / "bottle.tar"
    pack_tar(signed_bottle_bundle.path, tar)
    return tar


def test_tar_is_unpacked_once_by_manifest_sha(
    bundle_tar: Path, signed_bottle_bundle: SignedBundle, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = load_bundle(bundle_tar, [signed_bottle_bundle.public_key], state)
    assert first.root == state / "bundles" / first.sha
    inode = (first.root / "model.onnx").stat().st_ino
    again = load_bundle(bundle_tar, [signed_bottle_bundle.public_key], state)
    assert again.root == first.root and again.sha == first.sha
    assert (again.root / "model.onnx").stat().st_ino == inode  # reused, not unpacked again
    assert [p.name for p in (state / "bundles").iterdir()] == [first.sha]  # no .unpack-* left


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_unpacked_copy_is_unpacked_again(
    bundle_tar: Path, signed_bottle_bundle: SignedBundle, tmp_path: Path, damage: str
) -> None:
    """A torn copy (a power cut on an older version, a failing flash cell) must not stop the daemon for good."""
    state = tmp_path / "state"
    first = load_bundle(bundle_tar, [signed_bottle_bundle.public_key], state)
    onnx = first.root / "model.onnx"
    expected = first.manifest.files["model.onnx"].sha256
    if damage == "truncate":
        onnx.write_bytes(b"")
    else:
        onnx.unlink()
    healed = load_bundle(bundle_tar, [signed_bottle_bundle.public_key], state)
    assert healed.root == first.root and healed.sha == first.sha
    assert sha256_file(onnx) == expected
    assert [p.name for p in (state / "bundles").iterdir()] == [first.sha]


def test_damaged_bundle_folder_is_still_refused(signed_bottle_bundle: SignedBundle, tmp_path: Path) -> None:
    """A folder is used in place: there is no tar to recover from, so damage is refused, naming the file."""
    import shutil

    folder = tmp_path / "bundle"
    shutil.copytree(signed_bottle_bundle.path, folder)
    (folder / "model.onnx").write_bytes(b"")
    with pytest.raises(BundleError, match="model.onnx"):
        load_bundle(folder, [signed_bottle_bundle.public_key], tmp_path / "state")


def test_half_done_unpacks_of_dead_processes_are_removed(
    bundle_tar: Path, signed_bottle_bundle: SignedBundle, tmp_path: Path
) -> None:
    """A power cut mid-unpack leaves a ``.unpack-<pid>-*`` folder (as big as a bundle); the next unpack removes it,
    but never one whose process is alive."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(ended.stdout)
    bundles = tmp_path / "state" / "bundles"
    orphan = bundles / f".unpack-{dead_pid}-k2j4/bundle"
    orphan.mkdir(parents=True)
    (orphan / "model.onnx").write_bytes(b"half")
    alive = bundles / f".unpack-{os.getpid()}-busy"
    alive.mkdir()
    loaded = load_bundle(bundle_tar, [signed_bottle_bundle.public_key], tmp_path / "state")
    assert sorted(p.name for p in bundles.iterdir()) == sorted([alive.name, loaded.sha])


def test_a_tar_no_trusted_key_signed_is_refused_before_anything_is_unpacked(
    bundle_tar: Path, signed_bottle_bundle: SignedBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pushed tar signed by a stranger costs the device no disk: the signature is checked from the tar itself, and
    the real unpacker (watched, not replaced) is never called."""
    import shutil

    folder = tmp_path / "stranger"
    shutil.copytree(signed_bottle_bundle.path, folder)
    stranger_private, _ = generate_keypair(tmp_path / "stranger-key")
    sign_bundle(folder, stranger_private)
    stranger_tar = tmp_path / "stranger.tar"
    pack_tar(folder, stranger_tar)
    unpacked = watch_unpacking(monkeypatch, edge_daemon.model)
    state = tmp_path / "state"
    with pytest.raises(BundleError, match="signed by an untrusted key"):
        load_bundle(stranger_tar, [signed_bottle_bundle.public_key], state)
    assert unpacked == []
    assert not (state / "bundles").exists() or not any((state / "bundles").iterdir())
    # the trusted key's tar of the same model goes through the same path and is unpacked once
    loaded = load_bundle(bundle_tar, [signed_bottle_bundle.public_key], state)
    assert len(unpacked) == 1 and (loaded.root / "model.onnx").is_file()
    # Once that model is unpacked, the stranger's tar of it is still refused: it was answered from the unpacked copy
    # (found by the manifest's sha, which the signature does not change), so a push of it ended "already active".
    with pytest.raises(BundleError, match="signed by an untrusted key"):
        load_bundle(stranger_tar, [signed_bottle_bundle.public_key], state)
