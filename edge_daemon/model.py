"""The detector bundle the daemon serves: verified against the trusted keys, unpacked where the backends can read it.

A bundle folder is used in place; a ``.tar`` is checked from its headers, manifest and signature first
(deploy.bundle.verify_tar_manifest), then unpacked (safely: deploy.bundle.safe_extract) into
``<state_dir>/bundles/<manifest sha256>/``, a folder that outlives the process, since the backends read
model.onnx and engines/ from it for as long as they serve. Nothing runs unless the signature verifies against
one of ``trusted_keys`` (DESIGN.md, "Security model"); ``allow_unsigned`` exists for tests and the demo only.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from deploy.bundle import VerifiedBundle, manifest_sha256, safe_extract, verify_bundle_details, verify_tar_manifest
from deploy.durable import fsync_dir, fsync_tree, remove_orphans, scratch_prefix
from deploy.manifest import BundleError, Calibration, Manifest
from deploy.preprocess import InputSpec

log = logging.getLogger(__name__)
_UNPACK_PREFIX = ".unpack-"


@dataclass(frozen=True)
class LoadedBundle:
    """A verified bundle on disk. ``sha`` is sha256 of manifest.json: it covers every file, so it names the model."""

    root: Path
    manifest: Manifest
    sha: str
    key_id: str | None

    @property
    def name(self) -> str:
        return str(self.manifest.model.get("name", "unknown"))

    @property
    def version(self) -> str:
        return str(self.manifest.model.get("version", "unknown"))

    @cached_property  # read on every batch by the pipeline: built once
    def input_spec(self) -> InputSpec:
        return self.manifest.input.to_input_spec()

    @property
    def calibration(self) -> Calibration:
        return self.manifest.calibration

    @property
    def onnx_path(self) -> Path:
        return self.root / "model.onnx"

    def describe(self) -> dict[str, str | None]:
        """For P/info and events: name, version, sha, signing key id."""
        return {"name": self.name, "version": self.version, "sha": self.sha, "key_id": self.key_id}


def load_bundle(path: Path, trusted_keys: list[Path], state_dir: Path, *, allow_unsigned: bool = False) -> LoadedBundle:
    """Verify the bundle at ``path`` (folder or .tar) and return it ready to serve. BundleError naming the problem.

    With no trusted keys and ``allow_unsigned`` false every bundle is refused: a device must be told whom to trust.
    """
    path = Path(path)
    if not trusted_keys and not allow_unsigned:
        raise BundleError("no trusted_keys in the config: the daemon runs only bundles signed by a key it trusts")
    missing = [str(k) for k in trusted_keys if not Path(k).is_file()]
    if missing:
        raise BundleError(f"trusted key file(s) not found: {', '.join(missing)}")
    require_signature = not allow_unsigned
    if path.is_dir():
        verified = verify_bundle_details(path, trusted_keys, require_signature=require_signature)
        return LoadedBundle(path, verified.manifest, verified.manifest_sha256, verified.key_id)
    if not path.is_file():
        raise BundleError(f"no bundle at {path}" if not path.exists() else f"{path} is neither a folder nor a .tar")
    # The tar's own signature, manifest and member list first, also when its model is already unpacked: the
    # manifest's sha (which names the unpacked copy) does not change when a stranger signs the same files.
    verify_tar_manifest(path, trusted_keys, require_signature=require_signature)
    sha = manifest_sha256(path)  # names the folder only: what serves is verified below
    target = Path(state_dir) / "bundles" / sha
    if (target / "manifest.json").is_file():
        try:
            cached = verify_bundle_details(target, trusted_keys, require_signature=require_signature)
        except BundleError as exc:
            # A power cut during an earlier unpack on an older version, a failing flash cell, a hand edit, a key no
            # longer trusted: the tar is the source of truth, so it is unpacked and verified again.
            log.warning("unpacked bundle %s is damaged (%s): unpacking %s again", target, exc, path)
        else:
            if cached.manifest_sha256 == sha:
                return LoadedBundle(target, cached.manifest, cached.manifest_sha256, cached.key_id)
            log.warning("unpacked bundle %s holds another manifest: unpacking %s again", target, path)
    verified = _unpack_verified(path, target, trusted_keys, require_signature=require_signature)
    if verified.manifest_sha256 != sha:
        shutil.rmtree(target, ignore_errors=True)
        raise BundleError(f"{path} changed while it was being unpacked")
    return LoadedBundle(target, verified.manifest, verified.manifest_sha256, verified.key_id)


def _unpack_verified(tar: Path, target: Path, trusted_keys: list[Path], *, require_signature: bool) -> VerifiedBundle:
    """Unpack ``tar`` beside ``target``, verify the unpacked folder and only then put it at ``target`` (replacing
    whatever is there), so that nothing from a tar is ever written outside ``target``'s folder (the daemon's state
    directory) and after a power cut ``target`` is either complete and verified or absent: every file fsynced,
    renamed into place, the folder fsynced. The caller has checked the tar's signature, manifest and member list
    (``verify_tar_manifest``), so a tar that no trusted key signed costs no disk. BundleError (verification's) leaves
    ``target`` as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for orphan in remove_orphans(target.parent, _UNPACK_PREFIX):
        log.info("removed %s, a half-done unpack left by a crash or power cut", orphan)
    tmp = Path(tempfile.mkdtemp(prefix=scratch_prefix(_UNPACK_PREFIX), dir=target.parent))
    try:
        safe_extract(tar, tmp / "bundle")
        verified = verify_bundle_details(tmp / "bundle", trusted_keys, require_signature=require_signature)
        fsync_tree(tmp / "bundle")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp / "bundle", target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return verified
