"""Detector bundles: write, sign, verify, pack and safely unpack (DESIGN.md, "Detector bundle").

A bundle is a directory, or a plain .tar of that directory's contents (no top-level folder)::

    manifest.json   canonical JSON of deploy.manifest.Manifest; lists every other file (sha256, size)
    signature       Ed25519 over the exact manifest.json bytes (deploy.signing)
    model.onnx, golden/*.npy, engines/<key>.plan + .json, ...   exactly the files the manifest lists

Verification (``verify_bundle``) checks, each with its own one-line message: manifest.json present, parses,
known schema version; the signature present (unless not required) and made by a trusted key; the
bundle's min_daemon_version; every listed file present with its size and sha256; no file that the
manifest does not list; no symlinks or special files. A .tar's signature, manifest and member list (names and
sizes) are checked from its headers before anything is unpacked (``verify_tar_manifest``); it is then unpacked
by ``safe_extract``, which checks every member itself (absolute paths, '..', links, devices/fifos, sizes, member count,
truncation) before writing anything, and writes only regular files and folders under the target.

Every failure raises ``BundleError`` with one line naming the cause (the CLIs turn it into exit 2).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from deploy import __version__
from deploy.durable import atomic_file, remove_orphans, scratch_prefix, write_bytes_atomic
from deploy.manifest import (
    RESERVED_NAMES,
    BundleError,
    FileEntry,
    Manifest,
    canonical_bytes,
    file_digest,
    parse_manifest,
    version_tuple,
)
from deploy.signing import load_private_key, load_public_key, sign_manifest, verify_signature
from deploy.untrusted_json import parse_untrusted_json

__all__ = [
    "BundleError",
    "VerifiedBundle",
    "edit_bundle",
    "open_bundle",
    "pack_tar",
    "refresh_files",
    "safe_extract",
    "sign_bundle",
    "verify_bundle",
    "verify_bundle_details",
    "verify_tar_manifest",
    "write_bundle",
]

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "signature"
MAX_MANIFEST_BYTES = 16 * 1024**2
MAX_SIGNATURE_BYTES = 64 * 1024
DEFAULT_MAX_BYTES = 2 * 1024**3
DEFAULT_MAX_MEMBERS = 10_000
_CHUNK = 1024**2
_OPEN_PREFIX = "edge-bundle-"  # open_bundle's temporary folders: edge-bundle-<pid>-<random>
# A PAX or GNU long-name header is read whole into memory by tarfile, and a chain of them recursively (up to the
# recursion limit, ~1,000 deep): 64 KiB each (a bundle's are well under 1 KiB) keeps the worst case near 64 MB.
MAX_TAR_HEADER_READ = 64 * 1024


class _BoundedReads:
    """The tar file as tarfile sees it: a read longer than ``MAX_TAR_HEADER_READ`` (file data is skipped by seeking,
    so only an extended header is read whole) or of a negative length is refused before anything is allocated."""

    def __init__(self, f: IO[bytes], label: str) -> None:
        self._f = f
        self._label = label

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > MAX_TAR_HEADER_READ:
            raise BundleError(f"{self._label} refused: a tar header asks to read {n} bytes at once")
        return self._f.read(n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()


# What a malformed tar can make tarfile raise besides its own errors: chained extended headers recurse
# (RecursionError), a negative size reaches read() (ValueError).
_TAR_READ_ERRORS = (tarfile.TarError, EOFError, OSError, RecursionError, ValueError)
_COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}


@dataclass(frozen=True)
class VerifiedBundle:
    """What ``verify_bundle_details`` found: the manifest, the key that signed it (None if unsigned and
    allowed), and sha256 of the manifest.json bytes (the bundle's identity: it covers every file)."""

    manifest: Manifest
    key_id: str | None
    manifest_sha256: str


# --------------------------------------------------------------------------------------------- names


def _unsafe_name(name: str) -> str | None:
    """Why a path name may not be written inside a bundle (control characters, backslashes, absolute,
    '..'), or None. Shared by manifest entries and tar members."""
    if "\0" in name or "\\" in name or any(ord(c) < 32 for c in name):
        return "control characters or backslashes in the name"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in name.split("/"):
        return "'..' in the path"
    return None


def _check_relpath(name: str, what: str) -> str:
    """A bundle-relative posix path: no absolute path, no '..', '.', empty parts, backslashes or NULs."""
    if not isinstance(name, str) or not name:
        raise BundleError(f"{what}: empty file name")
    problem = _unsafe_name(name)
    if problem:
        raise BundleError(f"{what} {name!r}: {problem}")
    parts = name.split("/")
    if any(p in ("", ".") for p in parts):
        raise BundleError(f"{what} {name!r}: not a normalised relative path")
    return name


def _scan_dir(root: Path) -> dict[str, Path]:
    """Every regular file under ``root`` by relative posix path; BundleError on a symlink or special file."""
    found: dict[str, Path] = {}

    def unreadable(exc: OSError) -> None:  # os.walk skips a folder it cannot list unless told otherwise
        where = Path(os.path.relpath(exc.filename, root)).as_posix() if exc.filename else "."
        raise BundleError(f"cannot read bundle folder {where}: {exc.strerror or exc}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        base = Path(dirpath)
        for name in sorted(dirnames) + sorted(filenames):
            full = base / name
            rel = full.relative_to(root).as_posix()
            try:
                mode = full.lstat().st_mode
            except OSError as exc:
                raise BundleError(f"cannot read bundle file {rel}: {exc.strerror or exc}") from None
            if stat.S_ISLNK(mode):
                raise BundleError(f"bundle contains a symlink {rel}: refused")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise BundleError(f"bundle contains {rel}, which is not a regular file: refused")
            found[rel] = full
    return found


def _read_small(path: Path, limit: int, what: str) -> bytes:
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise BundleError(f"bundle has no {what}") from None
    except OSError as exc:
        raise BundleError(f"cannot read {what}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{what} is not a regular file (symlink or special file): refused")
    if st.st_size > limit:
        raise BundleError(f"{what} is {st.st_size} bytes, over the limit of {limit}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {what}: {exc.strerror or exc}") from None


def _signature_bytes(signature: Mapping[str, str]) -> bytes:
    return (json.dumps(dict(signature), sort_keys=True) + "\n").encode("ascii")


# ------------------------------------------------------------------------------------------- verify


def _verify_manifest(
    manifest_bytes: bytes,
    signature_raw: bytes | None,
    trusted_keys: Sequence[Path],
    *,
    daemon_version: str | None,
    require_signature: bool,
) -> tuple[Manifest, str | None]:
    """The checks that need only manifest.json and the signature file's bytes (None: there is none): the manifest
    parses, the signature is made by a trusted key (checked whenever there is one and keys are given, required when
    ``require_signature``), the bundle's min_daemon_version (``daemon_version`` None skips it), and every listed
    name is a safe relative path. Returns the manifest and the signing key's id (None when unsigned and allowed)."""
    manifest = parse_manifest(manifest_bytes)
    signer: str | None = None
    if signature_raw is not None:
        try:
            signature: Any = parse_untrusted_json(signature_raw)
        except ValueError:
            raise BundleError("signature file does not parse as JSON") from None
        if require_signature or trusted_keys:
            trusted = [load_public_key(Path(p)) for p in trusted_keys]
            signer = verify_signature(manifest_bytes, signature, trusted)
    elif require_signature:
        raise BundleError("bundle is unsigned (no signature file): sign it with edge-deploy sign BUNDLE --key KEY")

    if daemon_version is not None and version_tuple(manifest.min_daemon_version) > version_tuple(daemon_version):
        raise BundleError(
            f"bundle needs daemon version >= {manifest.min_daemon_version}, this is {daemon_version}: "
            "upgrade edge-inspect"
        )

    for name in manifest.files:
        _check_relpath(name, "manifest lists file")
        if name in RESERVED_NAMES:
            raise BundleError(f"manifest lists {name}, which may not be listed")
    return manifest, signer


def _check_listing(manifest: Manifest, present: Iterable[str]) -> None:
    """BundleError unless the files ``present`` (bundle-relative names; manifest.json and signature aside) are
    exactly the ones the manifest lists: the first missing one, else the first unexpected one."""
    names = set(present)
    for name in sorted(manifest.files):
        if name not in names:
            raise BundleError(f"file {name} listed in the manifest is missing")
    for name in sorted(names):
        if name not in manifest.files and name not in RESERVED_NAMES:
            raise BundleError(f"unexpected file {name}: not listed in the manifest")


def _check_size(name: str, size: int, entry: FileEntry) -> None:
    if size != entry.size:
        raise BundleError(f"file {name} was changed: {size} bytes, the manifest says {entry.size}")


def _verify_dir(
    root: Path,
    trusted_keys: Sequence[Path],
    *,
    daemon_version: str | None,
    require_signature: bool,
    check_signature: bool = True,
) -> VerifiedBundle:
    """The checks of verify_bundle on an unpacked directory. ``daemon_version`` None skips the version check."""
    manifest_bytes = _read_small(root / MANIFEST_NAME, MAX_MANIFEST_BYTES, MANIFEST_NAME)
    sig_path = root / SIGNATURE_NAME
    sig_raw = (
        _read_small(sig_path, MAX_SIGNATURE_BYTES, "signature file")
        if check_signature and os.path.lexists(sig_path)
        else None
    )
    manifest, signer = _verify_manifest(
        manifest_bytes,
        sig_raw,
        trusted_keys,
        daemon_version=daemon_version,
        require_signature=require_signature and check_signature,
    )
    present = _scan_dir(root)
    _check_listing(manifest, present)
    for name, entry in sorted(manifest.files.items()):
        try:
            size = present[name].stat().st_size
            digest = file_digest(present[name])[0] if size == entry.size else None
        except OSError as exc:  # e.g. a file the service user may not read
            raise BundleError(f"cannot read bundle file {name}: {exc.strerror or exc}") from None
        _check_size(name, size, entry)
        if digest != entry.sha256:
            raise BundleError(f"file {name} was changed: its sha256 does not match the manifest")
    return VerifiedBundle(manifest, signer, hashlib.sha256(manifest_bytes).hexdigest())


def verify_bundle_details(
    path: Path,
    trusted_keys: Sequence[Path],
    *,
    daemon_version: str = __version__,
    require_signature: bool = True,
) -> VerifiedBundle:
    """``verify_bundle``, also returning the signing key's id and the manifest's sha256. A .tar's signature, manifest
    and member list are checked before anything is unpacked (``verify_tar_manifest``)."""
    path = Path(path)
    if path.is_file():
        verify_tar_manifest(path, trusted_keys, daemon_version=daemon_version, require_signature=require_signature)
    with open_bundle(path) as root:
        return _verify_dir(root, trusted_keys, daemon_version=daemon_version, require_signature=require_signature)


def verify_bundle(
    path: Path,
    trusted_keys: Sequence[Path],
    *,
    daemon_version: str = __version__,
    require_signature: bool = True,
) -> Manifest:
    """Verify a bundle directory or .tar; return its manifest. BundleError naming the first problem.

    With ``require_signature=False`` an unsigned bundle passes; a signature that is present is still
    checked when trusted keys are given.
    """
    return verify_bundle_details(
        path, trusted_keys, daemon_version=daemon_version, require_signature=require_signature
    ).manifest


# -------------------------------------------------------------------------------------------- write


def _copy_hashing(src: Path | bytes, dst: Path, name: str) -> FileEntry:
    h = hashlib.sha256()
    size = 0
    with open(dst, "xb") as out:
        if isinstance(src, (bytes, bytearray, memoryview)):
            data = bytes(src)
            out.write(data)
            h.update(data)
            size = len(data)
        else:
            src = Path(src)
            if not src.is_file():
                raise BundleError(f"cannot add {name} to the bundle: {src} is not a file")
            try:
                f = open(src, "rb")  # noqa: SIM115 (closed by the with below)
            except OSError as exc:
                raise BundleError(f"cannot add {name} to the bundle: {src}: {exc.strerror or exc}") from None
            with f:
                while chunk := f.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return FileEntry(sha256=h.hexdigest(), size=size)


def _fresh_target(out_dir: Path) -> None:
    if os.path.lexists(out_dir) and (not out_dir.is_dir() or out_dir.is_symlink() or any(out_dir.iterdir())):
        raise BundleError(f"{out_dir} exists and is not an empty folder: choose a new --out")


def _install_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` folder to ``out_dir`` (absent or an empty folder)."""
    _fresh_target(out_dir)
    if out_dir.is_dir():
        out_dir.rmdir()
    os.chmod(tmp, 0o755)
    os.rename(tmp, out_dir)


def write_bundle(
    out_dir: Path,
    manifest_without_files: Manifest,
    files: Mapping[str, Path | bytes],
    private_key_path: Path | None,
) -> Manifest:
    """Write a bundle folder: the files, manifest.json (with ``files`` filled in) and, given a key, signature.

    ``files`` maps bundle-relative posix paths to a source file or bytes. ``out_dir`` must not exist or be
    empty; the bundle is built in a sibling ``<out_dir>.tmp-*`` folder and renamed into place, so a
    failure leaves nothing half-written. Returns the manifest as written.
    """
    out_dir = Path(out_dir)
    _fresh_target(out_dir)
    key = load_private_key(Path(private_key_path)) if private_key_path is not None else None
    for name in files:
        _check_relpath(name, "bundle file")
        if name in RESERVED_NAMES:
            raise BundleError(f"bundle file {name} is written by write_bundle itself; do not pass it in files")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as exc:
        raise BundleError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    try:
        entries: dict[str, FileEntry] = {}
        for name in sorted(files):
            dst = tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            entries[name] = _copy_hashing(files[name], dst, name)
        manifest = manifest_without_files.model_copy(update={"files": entries})
        data = canonical_bytes(manifest)
        try:  # what a device will read back must be what we meant to write
            reread = parse_manifest(data)
        except BundleError as exc:
            raise BundleError(f"refusing to write this manifest: {exc}") from None
        if canonical_bytes(reread) != data:
            raise BundleError("manifest does not survive a JSON round trip (NaN or infinite numbers?)")
        write_bytes_atomic(tmp / MANIFEST_NAME, data)
        if key is not None:
            write_bytes_atomic(tmp / SIGNATURE_NAME, _signature_bytes(sign_manifest(data, key)))
        _install_dir(tmp, out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise BundleError(f"cannot write bundle {out_dir}: {exc.strerror or exc}") from None
        raise
    return reread


def sign_bundle(bundle_dir: Path, private_key_path: Path) -> None:
    """(Re)write the signature over the existing manifest.json, after checking the files match it.

    Works on a folder, or on a .tar (unpacked, signed and re-packed in place, atomically).
    """
    key = load_private_key(Path(private_key_path))
    with edit_bundle(Path(bundle_dir)) as root:
        _sign_dir(root, key)


def _sign_dir(root: Path, key: Any) -> None:
    _verify_dir(root, (), daemon_version=None, require_signature=False, check_signature=False)
    data = _read_small(root / MANIFEST_NAME, MAX_MANIFEST_BYTES, MANIFEST_NAME)
    try:
        write_bytes_atomic(root / SIGNATURE_NAME, _signature_bytes(sign_manifest(data, key)))
    except OSError as exc:
        raise BundleError(f"cannot write the signature in {root}: {exc.strerror or exc}") from None


def refresh_files(
    bundle_dir: Path, private_key_path: Path | None = None, *, changeable: Sequence[str] = ("engines/",)
) -> Manifest:
    """Re-list the bundle's files in manifest.json after files were added or removed under ``changeable``
    prefixes (e.g. a compiled TensorRT engine), then re-sign with the key, or, without one, delete the now
    stale signature (the bundle is left unsigned but consistent; verify says it is unsigned).

    Files outside ``changeable`` must still match the manifest, so this never launders a tampered file.
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"no bundle folder at {root}")
    key = load_private_key(Path(private_key_path)) if private_key_path is not None else None
    old = parse_manifest(_read_small(root / MANIFEST_NAME, MAX_MANIFEST_BYTES, MANIFEST_NAME))
    present = {n: p for n, p in _scan_dir(root).items() if n not in RESERVED_NAMES}

    def is_changeable(name: str) -> bool:
        return any(name.startswith(prefix) for prefix in changeable)

    entries: dict[str, FileEntry] = {}
    for name in sorted(set(present) | set(old.files)):
        _check_relpath(name, "bundle file")
        if name not in present:
            if not is_changeable(name):
                raise BundleError(f"file {name} listed in the manifest is missing")
            continue
        digest, size = file_digest(present[name])
        if not is_changeable(name):
            if name not in old.files:
                raise BundleError(f"unexpected file {name}: not listed in the manifest")
            if old.files[name].sha256 != digest or old.files[name].size != size:
                raise BundleError(f"file {name} was changed: its sha256 does not match the manifest")
        entries[name] = FileEntry(sha256=digest, size=size)
    manifest = old.model_copy(update={"files": entries})
    data = canonical_bytes(manifest)
    try:
        write_bytes_atomic(root / MANIFEST_NAME, data)
        if key is not None:
            write_bytes_atomic(root / SIGNATURE_NAME, _signature_bytes(sign_manifest(data, key)))
        else:
            with contextlib.suppress(FileNotFoundError):
                (root / SIGNATURE_NAME).unlink()
    except OSError as exc:
        raise BundleError(f"cannot rewrite the manifest in {root}: {exc.strerror or exc}") from None
    return parse_manifest(data)


# ---------------------------------------------------------------------------------------------- tar


def pack_tar(bundle_dir: Path, tar_path: Path) -> None:
    """A plain, reproducible tar of the folder's contents: sorted, regular files and folders only,
    mtime 0, uid/gid 0, modes 0644/0755. Written atomically and durably (``deploy.durable``)."""
    root = Path(bundle_dir)
    tar_path = Path(tar_path)
    if not root.is_dir():
        raise BundleError(f"no bundle folder at {root}")
    files = _scan_dir(root)
    dirs = sorted(
        {Path(rel).parents[i].as_posix() for rel in files for i in range(len(Path(rel).parents) - 1)}
        | {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir() and not p.is_symlink()}
    )
    try:
        tar_path.resolve().relative_to(root.resolve())
    except ValueError:
        pass
    else:
        raise BundleError(f"the tar {tar_path} may not be inside the bundle folder {root}")
    entries = sorted([(d, None) for d in dirs] + [(f, files[f]) for f in files], key=lambda e: e[0])
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(tar_path) as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, src in entries:
                info = tarfile.TarInfo(name)
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if src is None:
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                else:
                    info.type = tarfile.REGTYPE
                    info.mode = 0o644
                    info.size = src.stat().st_size
                    with open(src, "rb") as f:
                        tar.addfile(info, f)
    except OSError as exc:
        raise BundleError(f"cannot write {tar_path}: {exc.strerror or exc}") from None


def _member_kind(m: tarfile.TarInfo) -> str | None:
    """None for a regular file or folder; else what it is, for the refusal message."""
    if m.sparse is not None or m.issparse():  # a PAX sparse file is typed REGTYPE: its map makes it one
        return "a sparse file"
    if m.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE):
        if m.size < 0:
            return f"a member of negative size {m.size}"
        return None
    if m.issym():
        return f"a symlink (-> {m.linkname!r})"
    if m.islnk():
        return f"a hardlink (-> {m.linkname!r})"
    if m.ischr() or m.isblk():
        return "a device"
    if m.isfifo():
        return "a fifo"
    if m.issparse():
        return "a sparse file"
    return f"an unsupported member type {m.type!r}"


def _member_name(name: str) -> str | None:
    """Tar member name -> bundle-relative path ('./' prefixes and trailing '/' dropped); None for the root."""
    problem = _unsafe_name(name)
    if problem:
        raise BundleError(f"tar member {name!r} refused: {problem}")
    kept = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(kept) if kept else None


@contextlib.contextmanager
def _scanned_tar(
    tar_path: Path, *, max_bytes: int, max_members: int
) -> Iterator[tuple[IO[bytes], list[tuple[tarfile.TarInfo, str]]]]:
    """Open a bundle tar and check every member header (``_check_members``) without unpacking anything; yield the
    open file and the members with their bundle-relative names. BundleError for a tar that is unreadable,
    compressed, over ``max_bytes`` or ``max_members``, or holds anything but safe regular files and folders."""
    label = tar_path.name
    try:
        f = open(tar_path, "rb")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:
        raise BundleError(f"cannot read {tar_path}: {exc.strerror or exc}") from None
    with f:
        file_size = os.fstat(f.fileno()).st_size
        # headers and padding cost at most ~1.5 KiB a member: anything much bigger than the limit is refused unread
        if file_size > max_bytes + (max_members + 10) * 1536:
            raise BundleError(f"{label} is {file_size} bytes, over the limit of {max_bytes}")
        head = f.read(8)
        for magic, kind in _COMPRESSED_MAGIC.items():
            if head.startswith(magic):
                raise BundleError(f"{label} is {kind}-compressed: bundles are plain (uncompressed) tar files")
        f.seek(0)
        yield f, _check_members(f, file_size, label, max_bytes=max_bytes, max_members=max_members)


def verify_tar_manifest(
    tar_path: Path,
    trusted_keys: Sequence[Path],
    *,
    daemon_version: str | None = __version__,
    require_signature: bool = True,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> None:
    """Check a bundle tar before any of it is unpacked, reading only its member headers, manifest.json and
    signature: the signature (as ``verify_bundle``: made by a trusted key, required unless ``require_signature``
    is false), the manifest and min_daemon_version, and that the tar holds exactly the files the manifest lists
    with the sizes it lists. So a tar nobody trusted signed costs no disk and no hashing. File contents are not
    read: their sha256 is checked after unpacking (``verify_bundle_details`` on the folder). BundleError naming
    the first problem."""
    tar_path = Path(tar_path)
    with _scanned_tar(tar_path, max_bytes=max_bytes, max_members=max_members) as (f, members):
        files = {name: m for m, name in members if m.isfile()}

        def small_member(name: str, limit: int, what: str) -> bytes | None:
            member = files.get(name)
            if member is None:
                return None
            if member.size > limit:
                raise BundleError(f"{what} is {member.size} bytes, over the limit of {limit}")
            f.seek(member.offset_data)
            return f.read(member.size)

        manifest_bytes = small_member(MANIFEST_NAME, MAX_MANIFEST_BYTES, MANIFEST_NAME)
        if manifest_bytes is None:
            raise BundleError(f"bundle has no {MANIFEST_NAME}")
        sig_raw = small_member(SIGNATURE_NAME, MAX_SIGNATURE_BYTES, "signature file")
    manifest, _ = _verify_manifest(
        manifest_bytes, sig_raw, trusted_keys, daemon_version=daemon_version, require_signature=require_signature
    )
    _check_listing(manifest, files)
    for name, entry in sorted(manifest.files.items()):
        _check_size(name, files[name].size, entry)


def safe_extract(
    tar_path: Path, dest: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, max_members: int = DEFAULT_MAX_MEMBERS
) -> None:
    """Unpack a bundle tar into ``dest`` (absent or an empty folder), refusing anything unsafe.

    Every member is checked first, before anything is written: absolute paths, '..' components,
    symlinks, hardlinks, devices, fifos, a member or the total over ``max_bytes``, more than
    ``max_members`` members, duplicate names, a compressed or truncated tar (data past the end of the
    file, or no end-of-archive marker). Then only regular files (0644, created O_EXCL|O_NOFOLLOW) and
    folders are written, each checked to resolve inside ``dest``. On any failure ``dest`` is left as it
    was found (absent or empty). Does not use tarfile's extraction (nor its filters) at all.
    """
    tar_path = Path(tar_path)
    dest = Path(dest)
    label = tar_path.name
    if os.path.lexists(dest) and (not dest.is_dir() or dest.is_symlink() or any(dest.iterdir())):
        raise BundleError(f"cannot unpack into {dest}: it exists and is not an empty folder")
    with _scanned_tar(tar_path, max_bytes=max_bytes, max_members=max_members) as (f, members):
        created = not os.path.lexists(dest)
        try:
            _extract_members(f, members, dest, label)
        except BaseException as exc:
            if created:
                shutil.rmtree(dest, ignore_errors=True)
            elif dest.is_dir():
                for child in dest.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            child.unlink()
            if isinstance(exc, OSError):
                raise BundleError(f"cannot unpack {label}: {exc.strerror or exc}") from None
            raise


def _check_members(
    f: IO[bytes], file_size: int, label: str, *, max_bytes: int, max_members: int
) -> list[tuple[tarfile.TarInfo, str]]:
    try:  # reads headers only; f is the caller's
        tar = tarfile.open(fileobj=_BoundedReads(f, label), mode="r:")  # type: ignore[call-overload]  # noqa: SIM115
    except _TAR_READ_ERRORS as exc:
        raise BundleError(f"{label} is not a tar file or is truncated ({exc})") from None
    members: list[tuple[tarfile.TarInfo, str]] = []
    kinds: dict[str, bool] = {}  # name -> is a folder
    total = 0
    last = "the start"
    while True:
        try:
            m = tar.next()
        except _TAR_READ_ERRORS as exc:
            raise BundleError(f"{label} is truncated or corrupt after member {last} ({type(exc).__name__})") from None
        if m is None:
            break
        if len(members) + 1 > max_members:
            raise BundleError(f"{label} has more than {max_members} members: refused")
        kind = _member_kind(m)
        if kind is not None:
            raise BundleError(f"tar member {m.name!r} refused: it is {kind}")
        name = _member_name(m.name)
        if name is None:
            if not m.isdir():
                raise BundleError(f"tar member {m.name!r} refused: a file with no name")
            continue
        if m.isfile():
            if m.size > max_bytes:
                raise BundleError(f"tar member {name} refused: {m.size} bytes, over the limit of {max_bytes}")
            total += m.size
            if total > max_bytes:
                raise BundleError(f"tar member {name} refused: the unpacked total exceeds {max_bytes} bytes")
            if m.offset_data + m.size > file_size:
                raise BundleError(f"{label} is truncated: member {name} ends past the end of the file")
        is_dir = m.isdir()
        if name in kinds and not (is_dir and kinds[name]):
            raise BundleError(f"tar member {name} refused: the name appears twice")
        kinds[name] = is_dir
        members.append((m, name))
        last = name
    # A complete tar ends with (at least) two zero blocks right after the last member; tarfile silently stops
    # at a truncated or garbled header, so check the end-of-archive marker ourselves.
    f.seek(tar.offset)
    trailer = f.read(2 * tarfile.BLOCKSIZE)
    if len(trailer) < 2 * tarfile.BLOCKSIZE or trailer.strip(b"\0"):
        raise BundleError(f"{label} is truncated or corrupt after member {last}: no end-of-archive marker")
    for name in kinds:  # a file used as a folder: 'a' then 'a/b'
        parents = name.split("/")[:-1]
        for i in range(1, len(parents) + 1):
            parent = "/".join(parents[:i])
            if kinds.get(parent) is False:
                raise BundleError(f"tar member {name} refused: its folder {parent} is a file in the tar")
    return members


def _extract_members(f: IO[bytes], members: list[tuple[tarfile.TarInfo, str]], dest: Path, label: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(dest)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for m, name in members:
        target = Path(root, *name.split("/"))
        folder = target if m.isdir() else target.parent
        folder.mkdir(parents=True, exist_ok=True)
        real = os.path.realpath(folder)
        if real != root and not real.startswith(root + os.sep):
            raise BundleError(f"tar member {name} refused: it would be written outside {dest}")
        if m.isdir():
            continue
        fd = os.open(target, flags, 0o644)
        with os.fdopen(fd, "wb") as out:
            f.seek(m.offset_data)
            left = m.size
            while left:
                chunk = f.read(min(left, _CHUNK))
                if not chunk:
                    raise BundleError(f"{label} is truncated: member {name} ends early")
                out.write(chunk)
                left -= len(chunk)


def manifest_sha256(path: Path) -> str:
    """sha256 of the manifest.json of the bundle at ``path`` (folder or tar): the bundle's identity, as in
    ``VerifiedBundle.manifest_sha256``, read WITHOUT verifying anything (cheap: a tar's other members are skipped).
    For telling whether a bundle changed, never for trusting one. BundleError when it cannot be read."""
    path = Path(path)
    if path.is_dir():
        return hashlib.sha256(_read_small(path / MANIFEST_NAME, MAX_MANIFEST_BYTES, MANIFEST_NAME)).hexdigest()
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=_BoundedReads(raw, path.name), mode="r:") as tar:  # type: ignore[call-overload]
            for member in tar:
                if not member.isfile() or _member_name(member.name) != MANIFEST_NAME:
                    continue
                if not 0 <= member.size <= MAX_MANIFEST_BYTES:
                    raise BundleError(f"{MANIFEST_NAME} is {member.size} bytes, over the limit of {MAX_MANIFEST_BYTES}")
                raw.seek(member.offset_data)
                return hashlib.sha256(raw.read(member.size)).hexdigest()
    except _TAR_READ_ERRORS as exc:
        raise BundleError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    raise BundleError(f"{path} holds no {MANIFEST_NAME}")


@contextlib.contextmanager
def edit_bundle(path: Path) -> Iterator[Path]:
    """Yield a folder in which to change the bundle at ``path`` in place.

    A folder is yielded as itself. A .tar is unpacked (``safe_extract``) into a temporary folder beside it, on the
    same file system, since a compiled engine can be hundreds of MB, and re-packed over ``path`` atomically
    (``pack_tar``) when the block ends without an exception; after an exception the .tar is left as it was.
    The temporary folder is removed either way. BundleError when ``path`` is neither (``open_bundle``'s).
    """
    path = Path(path)
    with open_bundle(path, tmp_dir=path.parent) as root:
        yield root
        if root != path:
            pack_tar(root, path)


@contextlib.contextmanager
def open_bundle(path: Path, *, tmp_dir: Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[Path]:
    """Yield a folder holding the bundle: ``path`` itself when it is a folder, else a temporary safe
    extraction of the tar (in ``tmp_dir`` if given), removed on exit. Nothing is verified here."""
    path = Path(path)
    if path.is_dir():
        yield path
        return
    if not path.exists():
        raise BundleError(f"no bundle at {path}")
    if not path.is_file():
        raise BundleError(f"{path} is neither a bundle folder nor a .tar file")
    if tmp_dir is not None:  # beside a bundle (edit_bundle): a killed edit's folder would stay there for ever
        remove_orphans(Path(tmp_dir), _OPEN_PREFIX)
    with tempfile.TemporaryDirectory(prefix=scratch_prefix(_OPEN_PREFIX), dir=tmp_dir) as tmp:
        root = Path(tmp) / "bundle"
        safe_extract(path, root, max_bytes=max_bytes)
        yield root
