"""TensorRT engines for a bundle: keys, sidecars, device probing, building, running, compiling.

An engine (``.plan``) is only valid for the TensorRT version, GPU (compute capability) and, on a
Jetson, the L4T release it was built on. It is named by its key

    <first 16 hex of sha256(model.onnx)>-trt<TensorRT version>-sm<compute capability>-<fp16|fp32>-b<max batch>

e.g. ``3fa2...-trt10.3.0-sm87-fp16-b8``, and has a sidecar ``<key>.json`` (``EngineSidecar``) that
says what it was built for. The sidecar is checked against the device (``sidecar_mismatch``)
BEFORE the plan is deserialised, so an unusable engine is a clear reason, not a crash.

TensorRT is optional: ``import tensorrt`` is guarded and everything that needs it raises
``TensorRTUnavailable`` naming what is missing (the tensorrt module, a CUDA GPU, or both; CLIs
map it to exit 3). The code uses the TensorRT 10 Python API (checked by mypy against
tensorrt-stubs 10.13). GPU facts come from the CUDA driver library (libcuda, via ctypes) so that
no cuda-python/pycuda is needed; device memory for running an engine comes from cupy when
importable, else the CUDA runtime library (libcudart, via ctypes).

Precision: fp16 engines are built with ``BuilderFlag.FP16`` and
``BuilderFlag.PREFER_PRECISION_CONSTRAINTS``; every REDUCE layer (the score and map reductions)
and every layer producing a network output is constrained to float32 (``layer.precision`` and
``layer.set_output_type``), and the outputs ``score``/``map`` are float32 tensors. PREFER (not
OBEY) so that a layer TensorRT cannot run in fp32 falls back with a warning instead of failing the
build; the golden parity gate (deploy.parity, fp16 tolerances) decides whether the result is good
enough. (TensorRT 10.12 deprecates these flags in favour of strongly typed networks; JetPack 6
ships TensorRT 10.3, where they are the way to do it. They still work in 10.13.)

Never imports torch. Python 3.10+.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from deploy.durable import remove_orphans, scratch_prefix, write_bytes_atomic
from deploy.manifest import BundleError, FileEntry, Manifest, canonical_bytes, sha256_file
from deploy.numpy_abi import numpy1_build_problem
from deploy.parity import ParityReport, check_parity, load_golden
from deploy.untrusted_json import parse_untrusted_json

# Why an INSTALLED tensorrt module does not import (None when it imports or is simply absent): a missing
# libnvinfer, or a build against NumPy 1.x under NumPy 2 (JetPack 6's), must not read as "not installed".
TENSORRT_IMPORT_ERROR: str | None = None
try:
    with contextlib.redirect_stderr(io.StringIO()) as _import_noise:  # NumPy's multi-line ABI warning, if any
        import tensorrt as trt

    if not hasattr(trt, "Builder"):  # tensorrt-stubs alone leaves an importable, empty namespace package
        trt = None  # type: ignore[assignment]
except ImportError as _exc:  # TensorRT is only on devices and workstations with NVIDIA's stack
    trt = None  # type: ignore[assignment]
    if not (isinstance(_exc, ModuleNotFoundError) and _exc.name == "tensorrt"):
        _abi = numpy1_build_problem(_exc, _import_noise.getvalue())
        TENSORRT_IMPORT_ERROR = f"{_exc}; {_abi}" if _abi else str(_exc)

EnginePrecision = Literal["fp16", "fp32"]
PRECISIONS: tuple[str, ...] = ("fp16", "fp32")
log = logging.getLogger(__name__)
MAX_BATCH_LIMIT = 1024
SIDECAR_VERSION = 1
TEGRA_RELEASE_FILE = Path("/etc/nv_tegra_release")

_KEY_RE = re.compile(
    r"^(?P<sha>[0-9a-f]{16})-trt(?P<trt>\d+(?:\.\d+){0,3})-sm(?P<sm>\d{2,3})-(?P<precision>fp16|fp32)-b(?P<batch>[1-9]\d*)$"
)
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_TRT_VERSION_RE = re.compile(r"^\d+(?:\.\d+){0,3}$")
_CC_RE = re.compile(r"^(\d{1,2})\.?(\d)$")


class EngineError(Exception):
    """An engine that cannot be built, loaded or used; one line naming the cause."""


class TensorRTUnavailable(EngineError):
    """TensorRT cannot run here; the message says which is missing: the tensorrt module, a CUDA GPU, or both."""


class EngineMismatch(EngineError):
    """An engine built for another TensorRT, GPU, L4T release, model, precision or batch range."""


class ParityFailed(EngineError):
    """A built engine failed the golden parity gate (it has been deleted); ``report`` has the figures."""

    def __init__(self, report: ParityReport) -> None:
        super().__init__(report.summary())
        self.report = report


# --------------------------------------------------------------------------------------------- keys


def sm_tag(compute_capability: str) -> str:
    """'8.7' or '87' -> '87' (the form used in engine keys). ValueError for anything else."""
    m = _CC_RE.match(str(compute_capability).strip())
    if m is None:
        raise ValueError(f"compute capability must look like '8.7' or '87', got {compute_capability!r}")
    return m.group(1) + m.group(2)


def engine_key(onnx_sha256: str, trt_version: str, sm: str, precision: EnginePrecision, max_batch: int) -> str:
    """``<sha[:16]>-trt<ver>-sm<cc>-<precision>-b<max_batch>``; each part validated (ValueError naming it).

    ``onnx_sha256``: the full 64-hex sha256 of model.onnx; ``trt_version`` like '10.3.0';
    ``sm`` a compute capability, '8.7' or '87'; ``precision`` fp16|fp32; ``max_batch`` 1..1024.
    """
    if not isinstance(onnx_sha256, str) or not _SHA_RE.match(onnx_sha256):
        raise ValueError(f"onnx_sha256 must be 64 lowercase hex digits, got {onnx_sha256!r}")
    if not isinstance(trt_version, str) or not _TRT_VERSION_RE.match(trt_version):
        raise ValueError(f"TensorRT version must look like '10.3.0', got {trt_version!r}")
    tag = sm_tag(sm)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be fp16 or fp32, got {precision!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise ValueError(f"max_batch must be an integer from 1 to {MAX_BATCH_LIMIT}, got {max_batch!r}")
    return f"{onnx_sha256[:16]}-trt{trt_version}-sm{tag}-{precision}-b{max_batch}"


def parse_engine_key(key: str) -> dict[str, str | int]:
    """Split a key into sha16, trt_version, sm, precision, max_batch; ValueError when it is not a key."""
    m = _KEY_RE.match(key) if isinstance(key, str) else None
    if m is None:
        raise ValueError(f"not an engine key: {key!r} (expected <sha16>-trt<ver>-sm<cc>-<fp16|fp32>-b<max batch>)")
    batch = int(m.group("batch"))
    if batch > MAX_BATCH_LIMIT:
        raise ValueError(f"not an engine key: {key!r} (max batch over {MAX_BATCH_LIMIT})")
    return {
        "sha16": m.group("sha"),
        "trt_version": m.group("trt"),
        "sm": m.group("sm"),
        "precision": m.group("precision"),
        "max_batch": batch,
    }


# ------------------------------------------------------------------------------------------ sidecar


@dataclass
class EngineSidecar:
    """What an engine was built for; stored as ``<key>.json`` beside ``<key>.plan``."""

    key: str
    onnx_sha256: str
    tensorrt_version: str
    cuda_version: str | None
    l4t_release: str | None
    compute_capability: str  # "8.7"
    precision: str  # fp16 | fp32
    min_batch: int
    opt_batch: int
    max_batch: int
    input_shape: list[int]  # [-1, C, H, W]: -1 is the dynamic batch axis
    output_shapes: dict[str, list[int]]  # {"score": [-1], "map": [-1, 1, H, W]}
    built_at: str  # ISO 8601 UTC
    sidecar_version: int = SIDECAR_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> EngineSidecar:
        """Parse and validate; ValueError with one line naming the problem."""
        try:
            raw = parse_untrusted_json(text)
        except ValueError as exc:
            raise ValueError(f"engine sidecar is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError("engine sidecar is not a JSON object")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"engine sidecar has unknown field(s): {', '.join(unknown)}")
        missing = sorted(n for n in names - set(raw) if n != "sidecar_version")
        if missing:
            raise ValueError(f"engine sidecar lacks field(s): {', '.join(missing)}")
        if raw.get("sidecar_version", SIDECAR_VERSION) != SIDECAR_VERSION:
            raise ValueError(f"engine sidecar version {raw['sidecar_version']!r} is not supported")

        def want(name: str, kinds: type | tuple[type, ...], optional: bool = False) -> None:
            value = raw[name]
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ValueError(f"engine sidecar field {name} has the wrong type: {value!r}")

        for name in ("key", "onnx_sha256", "tensorrt_version", "compute_capability", "precision", "built_at"):
            want(name, str)
        for name in ("cuda_version", "l4t_release"):
            want(name, str, optional=True)
        for name in ("min_batch", "opt_batch", "max_batch"):
            want(name, int)
        want("input_shape", list)
        want("output_shapes", dict)
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in raw["input_shape"]):
            raise ValueError("engine sidecar field input_shape must be a list of integers")
        for out, shape in raw["output_shapes"].items():
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
                raise ValueError(f"engine sidecar output shape {out!r} must be a list of integers")
        if raw["precision"] not in PRECISIONS:
            raise ValueError(f"engine sidecar precision {raw['precision']!r} is not fp16 or fp32")
        if not 1 <= raw["min_batch"] <= raw["opt_batch"] <= raw["max_batch"]:
            raise ValueError(
                f"engine sidecar batch range is inconsistent: min {raw['min_batch']}, opt {raw['opt_batch']}, "
                f"max {raw['max_batch']}"
            )
        parse_engine_key(raw["key"])
        return cls(**raw)


def sidecar_mismatch(
    sidecar: EngineSidecar,
    device: DeviceInfo,
    *,
    onnx_sha256: str | None = None,
    precision: str | None = None,
    max_batch: int | None = None,
) -> str | None:
    """Why the engine described by ``sidecar`` cannot be used on ``device`` (one line), or None when it can.

    Checks, in order: the sidecar's key agrees with its own fields; TensorRT present and the same
    version (engines are not portable across TensorRT versions); a GPU present with the same compute
    capability; the same L4T release (when either side has one); and, when given, the wanted
    model (``onnx_sha256``), ``precision`` and batch range (the engine must accept batches 1..``max_batch``).
    The CUDA version is recorded but not compared: the TensorRT version pins it.
    """
    try:
        own_key = engine_key(
            sidecar.onnx_sha256,
            sidecar.tensorrt_version,
            sidecar.compute_capability,
            cast(EnginePrecision, sidecar.precision),
            sidecar.max_batch,
        )
    except ValueError as exc:
        return f"engine sidecar is invalid: {exc}"
    if own_key != sidecar.key:
        return f"engine sidecar key {sidecar.key} does not match its own fields ({own_key})"
    if device.tensorrt_version is None:
        return "TensorRT is not installed on this device"
    if sidecar.tensorrt_version != device.tensorrt_version:
        return (
            f"engine built with TensorRT {sidecar.tensorrt_version}, this device has TensorRT {device.tensorrt_version}"
        )
    if device.compute_capability is None:
        return "no CUDA GPU found on this device"
    if sm_tag(sidecar.compute_capability) != sm_tag(device.compute_capability):
        gpu = f" ({device.gpu_name})" if device.gpu_name else ""
        return (
            f"engine built for compute capability {sidecar.compute_capability}, this GPU{gpu} has "
            f"{device.compute_capability}"
        )
    if sidecar.l4t_release != device.l4t_release:
        built = f"L4T {sidecar.l4t_release}" if sidecar.l4t_release else "a non-Jetson system"
        here = f"L4T {device.l4t_release}" if device.l4t_release else "not a Jetson (no L4T release)"
        return f"engine built on {built}, this device is {here}"
    if onnx_sha256 is not None and sidecar.onnx_sha256 != onnx_sha256:
        return f"engine built from another model.onnx (sha256 {sidecar.onnx_sha256[:16]}, bundle {onnx_sha256[:16]})"
    if precision is not None and sidecar.precision != precision:
        return f"engine precision is {sidecar.precision}, wanted {precision}"
    if max_batch is not None and not (sidecar.min_batch <= 1 and max_batch <= sidecar.max_batch):
        return f"engine accepts batches {sidecar.min_batch}..{sidecar.max_batch}, wanted 1..{max_batch}"
    return None


def read_sidecar(plan_path: Path) -> EngineSidecar:
    """The sidecar beside ``plan_path`` (``<key>.json``); EngineMismatch naming the file when missing or invalid."""
    path = plan_path.with_suffix(".json")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EngineMismatch(f"engine {plan_path.name} has no sidecar {path.name}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EngineMismatch(f"cannot read engine sidecar {path}: {exc}") from None
    try:
        sidecar = EngineSidecar.from_json(text)
    except ValueError as exc:
        raise EngineMismatch(f"{path.name}: {exc}") from None
    if sidecar.key != plan_path.stem:
        raise EngineMismatch(f"engine sidecar {path.name} is for key {sidecar.key}, not {plan_path.stem}")
    return sidecar


# ------------------------------------------------------------------------------------------- device


@dataclass
class DeviceInfo:
    tensorrt_version: str | None
    cuda_version: str | None  # CUDA runtime version when libcudart loads, else the driver's CUDA version
    compute_capability: str | None  # "8.7" (GPU 0)
    gpu_name: str | None
    l4t_release: str | None  # "36.3.0" from /etc/nv_tegra_release on a Jetson
    tensorrt_error: str | None = None  # why an installed tensorrt module fails to import

    def missing(self) -> list[str]:
        """What TensorRT needs and this device lacks, in words (empty when nothing is missing)."""
        out = []
        if self.tensorrt_version is None:
            out.append(
                f"a working tensorrt Python module (it is installed but fails to import: {self.tensorrt_error})"
                if self.tensorrt_error
                else "the tensorrt Python module (not installed)"
            )
        if self.compute_capability is None:
            out.append("a CUDA GPU (no NVIDIA driver library or no device)")
        return out


def _load_library(names: list[str]) -> ctypes.CDLL | None:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _libcudart() -> ctypes.CDLL | None:
    found = ctypes.util.find_library("cudart")
    names = ([found] if found else []) + ["libcudart.so", "libcudart.so.12", "libcudart.so.11.0"]
    return _load_library(names)


def _cuda_version_text(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _probe_gpu() -> tuple[str | None, str | None, str | None]:
    """(compute capability, GPU name, driver CUDA version) of GPU 0 via the CUDA driver API, or Nones."""
    lib = _load_library(["libcuda.so.1", "libcuda.so", "nvcuda.dll"])
    if lib is None:
        return None, None, None
    try:
        if lib.cuInit(0) != 0:
            return None, None, None
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
            return None, None, None
        dev = ctypes.c_int(0)
        if lib.cuDeviceGet(ctypes.byref(dev), 0) != 0:
            return None, None, None
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
        if lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev) != 0:
            return None, None, None
        if lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev) != 0:
            return None, None, None
        name_buf = ctypes.create_string_buffer(256)
        name = None
        if lib.cuDeviceGetName(name_buf, 256, dev) == 0:
            name = name_buf.value.decode("utf-8", "replace") or None
        version = ctypes.c_int(0)
        driver_cuda = _cuda_version_text(version.value) if lib.cuDriverGetVersion(ctypes.byref(version)) == 0 else None
        return f"{major.value}.{minor.value}", name, driver_cuda
    except AttributeError:  # a libcuda without the expected symbols
        return None, None, None


def _runtime_cuda_version() -> str | None:
    lib = _libcudart()
    if lib is None:
        return None
    version = ctypes.c_int(0)
    try:
        if lib.cudaRuntimeGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
            return None
    except AttributeError:
        return None
    return _cuda_version_text(version.value)


def read_l4t_release(path: Path = TEGRA_RELEASE_FILE) -> str | None:
    """'36.3.0' from a first line like '# R36 (release), REVISION: 3.0, GCID: ...'; None when absent."""
    try:
        first = path.read_text(encoding="utf-8", errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", first)
    return f"{m.group(1)}.{m.group(2).rstrip('.')}" if m else None


def probe_device() -> DeviceInfo:
    """TensorRT version (import-guarded module), GPU 0's compute capability and name (CUDA driver via
    ctypes), the CUDA version, and the L4T release. Anything absent is None; never raises."""
    trt_version = getattr(trt, "__version__", None) if trt is not None else None
    cc, name, driver_cuda = _probe_gpu()
    cuda = _runtime_cuda_version() or driver_cuda
    return DeviceInfo(
        tensorrt_version=str(trt_version) if trt_version else None,
        cuda_version=cuda,
        compute_capability=cc,
        gpu_name=name,
        l4t_release=read_l4t_release(),
        tensorrt_error=TENSORRT_IMPORT_ERROR,
    )


def require_tensorrt(device: DeviceInfo | None = None) -> DeviceInfo:
    """The probed device when TensorRT and a GPU are both there; TensorRTUnavailable naming what is missing."""
    device = device or probe_device()
    missing = device.missing()
    if missing:
        raise TensorRTUnavailable("TensorRT cannot run here: missing " + " and ".join(missing))
    return device


# ------------------------------------------------------------------------------------------- lookup


def find_engine(bundle_dir: Path, cache_dir: Path | None, key: str) -> Path | None:
    """The plan for exactly ``key``: the bundle's shipped ``engines/<key>.plan`` first, then ``cache_dir/<key>.plan``.

    A plan counts only as a regular file with its sidecar ``<key>.json`` beside it (a plan without
    one cannot be checked, and a build writes the sidecar last). ``key`` must be a valid engine key
    (ValueError otherwise: it becomes a file name). Whether the engine suits the device is
    ``sidecar_mismatch``'s business.
    """
    parse_engine_key(key)
    for folder in (Path(bundle_dir) / "engines", cache_dir):
        if folder is None:
            continue
        plan = Path(folder) / f"{key}.plan"
        sidecar = plan.with_suffix(".json")
        if plan.is_file() and not plan.is_symlink() and sidecar.is_file():
            return plan
    return None


def prune_engine_cache(
    cache_dir: Path, keep_onnx_sha256: Iterable[str], *, device: DeviceInfo | None = None
) -> list[Path]:
    """Delete the plans in ``cache_dir`` (and their sidecars) built from an ONNX file that none of
    ``keep_onnx_sha256`` (full sha256 hex digests) names, and, given the ``device`` this runs on (with its TensorRT
    version and compute capability known), those built for another TensorRT or GPU: after a JetPack upgrade no key
    can name them again. Return what was deleted, sorted.

    The cache is keyed by the ONNX file's sha (``engine_key``), so without this every model a device ever
    served leaves its engines behind (tens to hundreds of MB each, on a device's eMMC). Only files named
    ``<engine key>.plan`` / ``<engine key>.json`` are considered; anything else in the folder (ONNX
    Runtime's own cache, a build's temporary file) is left alone. A missing folder is an empty cache.
    """
    keep = {sha[:16] for sha in keep_onnx_sha256}
    here: tuple[str, str] | None = None
    if device is not None and device.tensorrt_version and device.compute_capability:
        here = (device.tensorrt_version, sm_tag(device.compute_capability))
    folder = Path(cache_dir)
    if not folder.is_dir():
        return []
    removed: list[Path] = []
    for path in sorted(folder.iterdir()):
        if path.suffix not in (".plan", ".json") or not path.is_file():
            continue
        try:
            key = parse_engine_key(path.stem)
        except ValueError:
            continue
        if key["sha16"] not in keep or (here is not None and (key["trt_version"], key["sm"]) != here):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


# -------------------------------------------------------------------------------------------- build


def _dims(dims: Any) -> list[int]:
    return [int(dims[i]) for i in range(len(dims))]


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def build_engine(
    onnx_path: Path,
    out_dir: Path,
    *,
    precision: EnginePrecision,
    max_batch: int,
    workspace_mb: int = 1024,
) -> tuple[Path, EngineSidecar]:
    """Build ``out_dir/<key>.plan`` and its sidecar ``<key>.json`` from ``onnx_path`` with TensorRT 10.

    One optimisation profile for input ``x``: min (1, C, H, W), opt and max (max_batch, C, H, W).
    fp16: see the module docstring (reductions and outputs kept in float32). The plan is written
    first and the sidecar last, each atomically (temp file + rename), so a reader that sees the
    sidecar sees a complete plan. Raises TensorRTUnavailable, or EngineError with the ONNX parser's
    errors / the builder's failure.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be fp16 or fp32, got {precision!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise ValueError(f"max_batch must be an integer from 1 to {MAX_BATCH_LIMIT}, got {max_batch!r}")
    device = require_tensorrt()
    assert trt is not None and device.tensorrt_version is not None and device.compute_capability is not None
    onnx_path = Path(onnx_path)
    onnx_sha = sha256_file(onnx_path)
    key = engine_key(onnx_sha, device.tensorrt_version, device.compute_capability, precision, max_batch)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT cannot parse {onnx_path.name}: " + "; ".join(errors[:5]) or "unknown error")

    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    outputs = {network.get_output(i).name: network.get_output(i) for i in range(network.num_outputs)}
    if list(inputs) != ["x"]:
        raise EngineError(f"{onnx_path.name}: inputs are {list(inputs)}, expected ['x']")
    if not {"score", "map"} <= set(outputs):
        raise EngineError(f"{onnx_path.name}: outputs are {list(outputs)}, expected 'score' and 'map'")
    in_shape = _dims(inputs["x"].shape)
    if len(in_shape) != 4 or in_shape[0] != -1 or min(in_shape[1:]) < 1:
        raise EngineError(
            f"{onnx_path.name}: input x has shape {in_shape}, expected [-1 (batch), C, H, W] with fixed C, H, W"
        )
    _, c, h, w = in_shape

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb * (1 << 20))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            feeds_output = any(layer.get_output(j).name in outputs for j in range(layer.num_outputs))
            if layer.type == trt.LayerType.REDUCE or feeds_output:
                layer.precision = trt.DataType.FLOAT
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.DataType.FLOAT)
    for tensor in outputs.values():
        tensor.dtype = trt.DataType.FLOAT
    profile = builder.create_optimization_profile()
    profile.set_shape("x", trt.Dims([1, c, h, w]), trt.Dims([max_batch, c, h, w]), trt.Dims([max_batch, c, h, w]))
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path.name} (see the TensorRT log above)")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sidecar = EngineSidecar(
        key=key,
        onnx_sha256=onnx_sha,
        tensorrt_version=device.tensorrt_version,
        cuda_version=device.cuda_version,
        l4t_release=device.l4t_release,
        compute_capability=device.compute_capability,
        precision=precision,
        min_batch=1,
        opt_batch=max_batch,
        max_batch=max_batch,
        input_shape=in_shape,
        output_shapes={name: _dims(outputs[name].shape) for name in ("score", "map")},
        built_at=_utc_now(),
    )
    plan_path = out_dir / f"{key}.plan"
    write_bytes_atomic(plan_path, bytes(memoryview(serialized)))
    write_bytes_atomic(plan_path.with_suffix(".json"), sidecar.to_json().encode("utf-8"))
    return plan_path, sidecar


# ------------------------------------------------------------------------------------------ running


class _DeviceMemory:
    """Device buffers, copies and a stream: cupy when importable, else libcudart through ctypes."""

    H2D, D2H = 1, 2  # cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost

    def __init__(self) -> None:
        self._cupy: Any = None
        self._cudart: ctypes.CDLL | None = None
        self._owned: list[Any] = []
        self._cupy_pointers: dict[int, Any] = {}
        try:
            import cupy

            self._cupy = cupy
            self._stream: Any = cupy.cuda.Stream(non_blocking=True)
            self.stream_handle = int(self._stream.ptr)
            return
        except ImportError:
            pass
        lib = _libcudart()
        if lib is None:
            raise TensorRTUnavailable(
                "TensorRT engines need device memory: neither cupy nor the CUDA runtime library "
                "libcudart could be loaded"
            )
        lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        lib.cudaFree.argtypes = [ctypes.c_void_p]
        lib.cudaMemcpyAsync.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        lib.cudaStreamCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        self._cudart = lib
        stream = ctypes.c_void_p()
        self._check(lib.cudaStreamCreate(ctypes.byref(stream)), "cudaStreamCreate")
        self._stream = stream
        self.stream_handle = int(stream.value or 0)

    @staticmethod
    def _check(code: int, what: str) -> None:
        if code != 0:
            raise EngineError(f"CUDA runtime call {what} failed with error {code}")

    def alloc(self, nbytes: int) -> int:
        if self._cupy is not None:
            mem = self._cupy.cuda.alloc(nbytes)
            self._cupy_pointers[int(mem.ptr)] = mem
            return int(mem.ptr)
        assert self._cudart is not None
        ptr = ctypes.c_void_p()
        self._check(self._cudart.cudaMalloc(ctypes.byref(ptr), nbytes), "cudaMalloc")
        self._owned.append(ptr)
        return int(ptr.value or 0)

    def to_device(self, dst: int, src: np.ndarray) -> None:
        if self._cupy is not None:
            self._cupy_pointers[dst].copy_from_host_async(src.ctypes.data_as(ctypes.c_void_p), src.nbytes, self._stream)
            return
        assert self._cudart is not None
        self._check(
            self._cudart.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, self.H2D, self._stream), "cudaMemcpyAsync"
        )

    def to_host(self, dst: np.ndarray, src: int) -> None:
        if self._cupy is not None:
            self._cupy_pointers[src].copy_to_host_async(dst.ctypes.data_as(ctypes.c_void_p), dst.nbytes, self._stream)
            return
        assert self._cudart is not None
        self._check(
            self._cudart.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, self.D2H, self._stream), "cudaMemcpyAsync"
        )

    def synchronize(self) -> None:
        if self._cupy is not None:
            self._stream.synchronize()
            return
        assert self._cudart is not None
        self._check(self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def __del__(self) -> None:
        if self._cudart is not None:
            for ptr in self._owned:
                with contextlib.suppress(Exception):
                    self._cudart.cudaFree(ptr)
            with contextlib.suppress(Exception):
                self._cudart.cudaStreamDestroy(self._stream)
        self._owned.clear()


def tensorrt_runner(
    plan_path: Path, *, device: DeviceInfo | None = None
) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A backend ``run(x float32 [B,C,H,W]) -> (score [B], map [B,1,H,W])`` on the engine ``plan_path``.

    Checks the sidecar against the device first (EngineMismatch with the reason), then deserialises
    with ``trt.Runtime`` and runs with ``set_input_shape`` / ``set_tensor_address`` /
    ``execute_async_v3``; batches larger than the engine's max batch are split. Raises
    TensorRTUnavailable when TensorRT, a GPU, or a way to get device memory is missing.
    """
    plan_path = Path(plan_path)
    device = require_tensorrt(device)
    assert trt is not None
    sidecar = read_sidecar(plan_path)
    reason = sidecar_mismatch(sidecar, device)
    if reason:
        raise EngineMismatch(f"engine {plan_path.name} cannot be used here: {reason}")
    memory = _DeviceMemory()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise EngineError(f"TensorRT could not deserialise {plan_path.name} (see the TensorRT log above)")
    context = engine.create_execution_context()
    if context is None:
        raise EngineError(f"TensorRT could not create an execution context for {plan_path.name}")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    if not {"x", "score", "map"} <= set(names):
        raise EngineError(f"engine {plan_path.name} has tensors {names}, expected x, score and map")
    if engine.get_tensor_dtype("x") != trt.DataType.FLOAT:
        raise EngineError(f"engine {plan_path.name} input x is not float32")
    max_b = sidecar.max_batch
    _, c, h, w = sidecar.input_shape
    out_dtypes = {name: np.dtype(trt.nptype(engine.get_tensor_dtype(name))) for name in ("score", "map")}
    x_shape_max = (max_b, c, h, w)
    addresses = {"x": memory.alloc(int(np.prod(x_shape_max)) * 4)}
    context.set_input_shape("x", x_shape_max)
    for name in ("score", "map"):
        shape = _dims(context.get_tensor_shape(name))
        addresses[name] = memory.alloc(int(np.prod(shape)) * out_dtypes[name].itemsize)
    for name, addr in addresses.items():
        if not context.set_tensor_address(name, addr):
            raise EngineError(f"TensorRT refused the device address of tensor {name}")

    def run_chunk(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not context.set_input_shape("x", tuple(x.shape)):
            raise EngineError(f"engine {plan_path.name} refuses input shape {tuple(x.shape)}")
        host = {
            name: np.empty(_dims(context.get_tensor_shape(name)), dtype=out_dtypes[name]) for name in ("score", "map")
        }
        memory.to_device(addresses["x"], x)
        if not context.execute_async_v3(memory.stream_handle):
            raise EngineError(f"TensorRT execution of {plan_path.name} failed")
        for name, arr in host.items():
            memory.to_host(arr, addresses[name])
        memory.synchronize()
        return host["score"].astype(np.float32, copy=False), host["map"].astype(np.float32, copy=False)

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise ValueError(f"input must be [B, {c}, {h}, {w}], got {list(x.shape)}")
        parts = [run_chunk(np.ascontiguousarray(x[i : i + max_b])) for i in range(0, x.shape[0], max_b)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    # keep TensorRT objects alive as long as the runner
    run.__dict__["_keepalive"] = (runtime, engine, context, memory, logger)
    return run


# ------------------------------------------------------------------------------------------ compile


def _load_bundle_dir(bundle_dir: Path) -> Manifest:
    from deploy.bundle import verify_bundle

    return verify_bundle(bundle_dir, [], require_signature=False)


def _update_manifest(bundle_dir: Path, manifest: Manifest, new_files: list[str], sign_key: Path | None) -> Manifest:
    """List ``new_files`` in manifest.files, rewrite manifest.json, drop the stale signature, re-sign if a key."""
    files = dict(manifest.files)
    for rel in new_files:
        path = bundle_dir / rel
        files[rel] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    updated = manifest.model_copy(update={"files": dict(sorted(files.items()))})
    signature = bundle_dir / "signature"
    if signature.exists():
        signature.unlink()  # it covered the old manifest: unsigned-but-consistent beats signed-but-wrong
    write_bytes_atomic(bundle_dir / "manifest.json", canonical_bytes(updated))
    if sign_key is not None:
        from deploy.bundle import sign_bundle

        sign_bundle(bundle_dir, sign_key)
    return updated


def install_engine(bundle_dir: Path, manifest: Manifest, staged_plan: Path, sign_key: Path | None) -> Path:
    """Move a gated ``<key>.plan`` and its sidecar ``<key>.json`` (built elsewhere on the same file system) into
    ``bundle_dir/engines/``, replacing an engine of the same key, and list both in the manifest (``_update_manifest``:
    re-signed with ``sign_key``, else left unsigned-but-consistent). Returns the installed plan's path."""
    engines_dir = bundle_dir / "engines"
    engines_dir.mkdir(exist_ok=True)
    plan = engines_dir / staged_plan.name
    os.replace(staged_plan, plan)
    os.replace(staged_plan.with_suffix(".json"), plan.with_suffix(".json"))  # the sidecar last, as build_engine
    _update_manifest(
        bundle_dir, manifest, [f"engines/{plan.name}", f"engines/{plan.with_suffix('.json').name}"], sign_key
    )
    return plan


def compile_bundle(
    bundle: Path,
    *,
    precision: EnginePrecision,
    max_batch: int = 8,
    sign_key: Path | None = None,
) -> tuple[str, ParityReport]:
    """Build a TensorRT engine for the bundle's model.onnx into its ``engines/`` and gate it; return the
    engine's name in the bundle (``engines/<key>.plan``) and the gate's report.

    ``bundle`` is a folder or a .tar (DESIGN.md, "Detector bundle"): a .tar is unpacked beside itself, compiled
    as a folder and re-packed in place only once the engine passed (``deploy.bundle.edit_bundle``).

    Order: TensorRT and a GPU present (TensorRTUnavailable); the bundle consistent
    (BundleError; the signature is not required: compiling is not a trust decision, the daemon
    verifies later); the signing key loads when given (BundleError, before any slow build); build;
    run the golden parity gate on the engine at ``precision`` tolerances in batches of
    ``max_batch``. The engine is built and gated in a folder beside the bundle and moved in only once it
    passed (``install_engine``); a failing gate deletes it, leaves the bundle as it was (an engine of the same
    key already in it included) and raises ParityFailed with the figures.

    The engine changes the bundle's file set, so manifest.files is rewritten to list the plan and its
    sidecar and the old signature (over the old manifest) is removed: with ``sign_key`` the bundle is
    re-signed, without it the bundle is left unsigned-but-consistent and ``edge-deploy verify`` says
    so until ``edge-deploy sign`` is run.
    """
    from deploy.bundle import edit_bundle

    device = require_tensorrt()
    with edit_bundle(Path(bundle)) as bundle_dir:
        plan, report = _compile_dir(bundle_dir, device, precision=precision, max_batch=max_batch, sign_key=sign_key)
    return f"engines/{plan.name}", report


def _compile_dir(
    bundle_dir: Path, device: DeviceInfo, *, precision: EnginePrecision, max_batch: int, sign_key: Path | None
) -> tuple[Path, ParityReport]:
    """compile_bundle on a bundle folder; returns the installed plan's path."""
    manifest = _load_bundle_dir(bundle_dir)
    if "model.onnx" not in manifest.files:
        raise BundleError("the manifest lists no model.onnx")
    load_golden(bundle_dir, manifest)  # a bad golden set is a bad bundle: find out before the slow build
    if sign_key is not None:
        from deploy.signing import load_private_key

        load_private_key(sign_key)
    # Built and gated outside the bundle, then moved in: a rebuild for the same key (same model, TensorRT, GPU,
    # precision and batch) that fails its gate must not touch the engine the signed manifest already lists.
    prefix = f".{bundle_dir.name}.compile-"
    for orphan in remove_orphans(bundle_dir.parent, prefix):
        log.info("removed %s, left by a compile that was killed", orphan)
    staging = Path(tempfile.mkdtemp(prefix=scratch_prefix(prefix), dir=bundle_dir.parent))
    try:
        staged, _ = build_engine(bundle_dir / "model.onnx", staging, precision=precision, max_batch=max_batch)
        runner = tensorrt_runner(staged, device=device)
        report = check_parity(runner, bundle_dir, manifest, precision=precision, batch=max_batch)
        if not report.ok:
            raise ParityFailed(report)
        plan = install_engine(bundle_dir, manifest, staged, sign_key)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return plan, report


def compile_main(bundle: Path, precision: str, max_batch: int, sign_key: Path | None) -> int:
    """``edge-trainer compile BUNDLE --precision fp16 --max-batch 8 [--sign-key KEY]``: one line, an exit code.

    0 compiled and gated; 1 the build or the parity gate failed (the engine is deleted), or the disk failed (full);
    2 a bad bundle, key or argument; 3 TensorRT or a CUDA GPU is missing. The arguments and that the bundle exists
    are checked first (a typo is a typo on any machine), then TensorRT's availability, then the bundle's contents.
    """
    try:
        if precision not in PRECISIONS:
            raise BundleError(f"--precision must be fp16 or fp32, got {precision!r}")
        if isinstance(max_batch, bool) or not 1 <= max_batch <= MAX_BATCH_LIMIT:
            raise BundleError(f"--max-batch must be from 1 to {MAX_BATCH_LIMIT}, got {max_batch}")
        if not Path(bundle).exists():
            raise BundleError(f"no bundle at {bundle}")
        require_tensorrt()
        plan, report = compile_bundle(
            Path(bundle), precision=cast(EnginePrecision, precision), max_batch=max_batch, sign_key=sign_key
        )
    except TensorRTUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ParityFailed as exc:
        print(f"error: engine rejected and deleted: {exc}", file=sys.stderr)
        return 1
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full eMMC during the build or the install: the bundle is left as it was
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: cannot write the engine{where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    signed = "re-signed" if sign_key is not None else "UNSIGNED now: run `edge-deploy sign` before deploying"
    print(f"compiled {plan} into {bundle}; {report.summary()}; manifest updated, {signed}")
    return 0


def iter_engines(bundle_dir: Path) -> Iterator[tuple[Path, EngineSidecar | None]]:
    """The bundle's shipped plans with their sidecars (None when missing or invalid), sorted by name."""
    folder = Path(bundle_dir) / "engines"
    if not folder.is_dir():
        return
    for plan in sorted(folder.glob("*.plan")):
        try:
            yield plan, read_sidecar(plan)
        except EngineMismatch:
            yield plan, None


__all__ = [
    "DeviceInfo",
    "EngineError",
    "EngineMismatch",
    "EngineSidecar",
    "ParityFailed",
    "TensorRTUnavailable",
    "build_engine",
    "compile_bundle",
    "compile_main",
    "engine_key",
    "find_engine",
    "iter_engines",
    "parse_engine_key",
    "prune_engine_cache",
    "probe_device",
    "read_l4t_release",
    "read_sidecar",
    "require_tensorrt",
    "sidecar_mismatch",
    "sm_tag",
    "tensorrt_runner",
]
