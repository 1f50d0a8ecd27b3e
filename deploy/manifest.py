"""The bundle manifest (DESIGN.md, "Detector bundle"): pydantic v2 models and their canonical bytes.

``manifest.json`` holds ``canonical_bytes(manifest)``; the Ed25519 signature (deploy.signing) is over
those exact bytes, and the manifest lists every other file of the bundle with its sha256 and size,
so one signature covers the whole bundle. Unknown fields are refused (``extra="forbid"``): a
manifest from a newer schema must bump ``schema_version`` rather than add fields silently.

``BundleError`` lives here (the lowest module of the bundle layer) so that signing and bundle code
share it without an import cycle; ``deploy.bundle.BundleError`` and ``deploy.signing.BundleError``
are the same class.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deploy.untrusted_json import parse_untrusted_json

if TYPE_CHECKING:
    from deploy.preprocess import InputSpec


def file_digest(path: Path) -> tuple[str, int]:
    """(hex sha256, size in bytes) of the file at ``path``, read in 1 MiB blocks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``."""
    return file_digest(path)[0]


SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})
RESERVED_NAMES = frozenset({"manifest.json", "signature"})


class BundleError(Exception):
    """A bundle, key or signature that cannot be used. The message is one line naming the cause (CLIs: exit 2)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class InputSpecModel(_Strict):
    """What the model takes; ``to_input_spec`` gives deploy.preprocess's InputSpec for the daemon."""

    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[1, 3]
    colour_order: Literal["RGB", "BGR"] = "RGB"
    dtype: Literal["float32"] = "float32"
    range: tuple[float, float] = (0.0, 1.0)
    # Tiling is handled inside the graph for the current models; kept for the daemon.
    tiling: dict[str, Any] | None = None

    def to_input_spec(self) -> InputSpec:
        from deploy.preprocess import InputSpec

        return InputSpec(height=self.height, width=self.width, channels=self.channels, colour_order=self.colour_order)


class Calibration(_Strict):
    """Score calibration on held-out normal images; ``normalise`` maps raw scores so that the threshold is 0.5."""

    method: Literal["quantile", "f1"]
    target_false_alarm_rate: float | None
    threshold: float
    raw_min: float
    raw_max: float
    quantiles: dict[str, float]  # keys like "0.5", "0.9", "0.99", "0.995", "0.999"
    n_images: int
    source: str  # e.g. "held-out 10% of train/good (674 images)"

    @overload
    def normalise(self, raw: float) -> float: ...
    @overload
    def normalise(self, raw: np.ndarray) -> np.ndarray: ...
    def normalise(self, raw: np.ndarray | float) -> np.ndarray | float:
        """clamp((raw - threshold) / (raw_max - raw_min) + 0.5, 0, 1): the threshold maps to 0.5.

        A degenerate range (raw_max == raw_min) uses 1e-12 as the span. A float in gives a float out;
        an array gives a float32 array of the same shape.
        """
        span = float(self.raw_max - self.raw_min)
        if abs(span) < 1e-12:
            span = 1e-12
        if isinstance(raw, np.ndarray):
            out = (raw.astype(np.float64) - self.threshold) / span + 0.5
            return np.clip(out, 0.0, 1.0).astype(np.float32)
        return float(min(1.0, max(0.0, (float(raw) - self.threshold) / span + 0.5)))


class FileEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class GoldenSpec(_Strict):
    """The golden set a backend must reproduce: ``n`` images, their labels, and the fp32 tolerances."""

    n: int = Field(ge=0)
    labels: list[int]
    score_rtol: float
    score_atol: float
    map_atol: float


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    model: dict[str, Any]  # {"name": "ae", "version": "<run name + date>", "config": {...}}
    created: str  # ISO 8601 UTC
    input: InputSpecModel
    outputs: dict[str, Any]  # {"score": {"shape": ["B"], "dtype": "float32"}, "map": {...}}
    calibration: Calibration
    metrics: dict[str, Any] | None = None
    training: dict[str, Any]  # {"data", "data_digest", "n_train", "n_val", "epochs", "seed"}
    golden: GoldenSpec
    # relative posix path -> entry; never "manifest.json" or "signature". Filled in by write_bundle.
    files: dict[str, FileEntry] = Field(default_factory=dict)
    min_daemon_version: str = "0.1.0"


def canonical_bytes(manifest: Manifest) -> bytes:
    """The exact bytes stored in manifest.json and signed: sorted keys, no spaces, UTF-8."""
    return json.dumps(
        manifest.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def parse_manifest(data: bytes) -> Manifest:
    """manifest.json bytes -> Manifest. BundleError when it does not parse, has an unknown schema version,
    or does not match the schema (the first problem is named)."""
    try:
        raw = parse_untrusted_json(data)
    except ValueError as exc:  # not UTF-8, not JSON, or nested too deeply
        raise BundleError(f"manifest.json does not parse as JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise BundleError("manifest.json is not a JSON object")
    version = raw.get("schema_version")
    if type(version) is not int:
        raise BundleError(f"manifest.json has no integer schema_version (got {version!r})")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(SUPPORTED_SCHEMA_VERSIONS))
        raise BundleError(
            f"manifest schema_version {version} is not supported by this version (supports {supported}); "
            "upgrade edge-inspect"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        count = exc.error_count()
        raise BundleError(f"manifest.json is invalid at {where}: {first['msg']} ({count} error(s))") from None


_VERSION_PART = re.compile(r"^(\d+)")


def version_tuple(version: str) -> tuple[int, ...]:
    """'0.10.2' -> (0, 10, 2); a part's trailing non-digits are ignored ('1.2.0rc1' -> (1, 2, 0)).

    Trailing zeros are dropped so that '0.2' == '0.2.0'. BundleError on a version with no numeric parts.
    """
    parts: list[int] = []
    for piece in version.strip().split("."):
        m = _VERSION_PART.match(piece)
        if m is None:
            break
        parts.append(int(m.group(1)))
        if m.group(1) != piece:
            break
    if not parts:
        raise BundleError(f"not a version number: {version!r}")
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)
