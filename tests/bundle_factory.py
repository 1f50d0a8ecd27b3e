"""The daemon tests' detector, and a command that builds it ahead of time for a test run without torch.

    python -m tests.bundle_factory OUT [--data DIR]    # with the trainer's extras (torch)

``make test-py310`` builds it with the project's own venv, then runs the daemon's tests on Python 3.10 (JetPack 6's,
where the CPU torch wheel does not install) with ``EDGE_INSPECT_TEST_BUNDLE=OUT``: the ``signed_bottle_bundle``
fixture then copies OUT instead of training, and the update tests take their newer versions from OUT/newer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest

PREBUILT_ENV = "EDGE_INSPECT_TEST_BUNDLE"


@dataclass(frozen=True)
class SignedBundle:
    path: Path  # bundle folder
    public_key: Path  # the key it is signed with (trust it)
    private_key: Path


def layout(root: Path) -> SignedBundle:
    """Where a built bundle and its key pair lie under ``root``."""
    return SignedBundle(root / "bundle", root / "keys" / "line.pub", root / "keys" / "line.key")


def make_signed_bottle_bundle(shared_data: Path, root: Path) -> SignedBundle:
    """A real detector under ``root``: a small AE trained 15 epochs on the MVTec bottle train/good images (32 px,
    one torch thread, about 5 s of CPU; image AUROC about 0.8), exported as a bundle signed with a fresh key.
    The training run stays in ``root/run`` (tests export it again as newer versions)."""
    import torch

    from deploy.signing import generate_keypair
    from trainer.export import export_run
    from trainer.train import TrainOptions, train

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(
            TrainOptions(
                model="ae",
                data=shared_data / "mvtec_bottle",
                out=root / "run",
                epochs=15,
                batch_size=16,
                image_size=32,
                device="cpu",
                model_options={"base_channels": 16, "latent": 32},
            )
        )
        private, _ = generate_keypair(root / "keys" / "line")
        export_run(root / "run", root / "bundle", sign_key=private)
    finally:
        torch.set_num_threads(before)
    return layout(root)


NEWER = ("v2", "v3", "v4")  # the later versions the update tests push, oldest first


def export_newer(built: SignedBundle, out: Path) -> Path:
    """A newer signed bundle of ``built``'s training run in ``out``: exported again a second later (the manifest's
    "created" has one-second resolution), so a later version with another sha."""
    from trainer.export import export_run

    time.sleep(1.1)
    export_run(built.path.parent / "run", out, sign_key=built.private_key)
    return out


def prebuilt_newer(name: str, out: Path) -> Path | None:
    """A copy in ``out`` of the prebuilt newer version ``name`` when $EDGE_INSPECT_TEST_BUNDLE is set, else None."""
    source = os.environ.get(PREBUILT_ENV)
    if not source:
        return None
    built = Path(source) / "newer" / name / "manifest.json"
    if not built.is_file():
        raise FileNotFoundError(f"{PREBUILT_ENV}={source} has no newer version {name}: build it again")
    shutil.copytree(built.parent, out)
    return out


def copy_prebuilt(source: Path, root: Path) -> SignedBundle:
    """A copy under ``root`` of a bundle that ``python -m tests.bundle_factory`` built in ``source`` (tests may
    change the files they are given). Raises FileNotFoundError naming what is missing."""
    built = layout(source)
    missing = [str(p) for p in (built.path / "manifest.json", built.public_key, built.private_key) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"{PREBUILT_ENV}={source} is not built by `python -m tests.bundle_factory`: no {', '.join(missing)}"
        )
    for name in ("bundle", "keys"):
        shutil.copytree(source / name, root / name)
    return layout(root)


def main() -> None:
    from tests.conftest import SHARED_DATA

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a new or empty folder, or one this command built before")
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="the shared data folder (mvtec_bottle in it)")
    args = parser.parse_args()
    ours = {"bundle", "keys", "run", "newer"}
    found = {p.name for p in args.out.iterdir()} if args.out.is_dir() else set()
    if found - ours:
        parser.error(f"{args.out} holds other files ({', '.join(sorted(found - ours))}): give a new or empty folder")
    for name in found:  # an earlier build: built again, so that it matches today's code
        shutil.rmtree(args.out / name)
    args.out.mkdir(parents=True, exist_ok=True)
    built = make_signed_bottle_bundle(args.data, args.out)
    for name in NEWER:
        export_newer(built, args.out / "newer" / name)
    print(f"built {built.path} and newer versions {', '.join(NEWER)} (signed by {built.public_key})")


if __name__ == "__main__":
    main()


def watch_unpacking(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[Path]:
    """The destinations of every ``module.safe_extract`` call from now on, in order. The real unpacker still runs:
    this watches, it does not replace (for tests that a tar is judged before anything of it is written)."""
    unpacked: list[Path] = []
    real_extract = module.safe_extract

    def watched_extract(tar: Path, dest: Path, **kwargs: int) -> None:
        unpacked.append(dest)
        real_extract(tar, dest, **kwargs)

    monkeypatch.setattr(module, "safe_extract", watched_extract)
    return unpacked
