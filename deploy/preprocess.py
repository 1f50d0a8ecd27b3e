"""THE preprocessing: camera/file image -> model input, identical in trainer, exporter and daemon.

Contract (MODELS.md, "The contract every model keeps"):
OpenCV decode -> resize -> colour order -> uint8 HWC -> float32 in [0, 1], NCHW, the model's
channel count. Resizing halves the image with INTER_AREA while it is at least twice the target
in both directions (OpenCV's fast integer path, which anti-aliases), then finishes with
INTER_LINEAR. Colour conversion happens after resizing (cheaper on the smaller image).
Model-specific normalisation (e.g. [-1, 1]) is NOT done here: it lives inside the model graph.

The work is split in two so that callers can cache the exact uint8 result and convert later:
``prepare_uint8`` (geometry and colour, uint8 CHW) and ``to_float`` (``/ 255`` as float32).
``preprocess`` = ``to_float(prepare_uint8(...))``. numpy + OpenCV only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

ColourOrder = Literal["RGB", "BGR"]


class ImageReadError(ValueError):
    """An image file that cannot be read: missing, not an image, or truncated. The message names it."""


@dataclass(frozen=True)
class InputSpec:
    """What a model takes: ``height`` x ``width`` pixels, ``channels`` 1 (grey) or 3 (colour).

    ``colour_order`` is the channel order of 3-channel inputs; OpenCV decodes BGR, models are
    trained on RGB by default.
    """

    height: int
    width: int
    channels: int
    colour_order: ColourOrder = "RGB"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")
        if self.colour_order not in ("RGB", "BGR"):
            raise ValueError(f"colour_order must be RGB or BGR, got {self.colour_order!r}")


def _cv2():  # type: ignore[no-untyped-def]
    # Imported lazily so that `deploy` stays importable (bundle tools, signing) without OpenCV.
    import cv2

    return cv2


def _jpeg_is_truncated(data: bytes) -> bool:
    """True when a JPEG's entropy-coded data is not followed by an EOI marker (FF D9).

    The marker segments before the first scan are walked by their lengths (so an EXIF thumbnail's
    own EOI is skipped), then EOI is looked for anywhere after that scan's header: entropy-coded
    data cannot contain FF D9, and bytes after EOI (maker trailers, padding) are allowed. A header
    that cannot be walked is left to the decoder to judge.
    """
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False  # not a marker where one must be: corrupt, not truncated
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker == 0xD9:
            return False
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDA:
            return data.find(b"\xff\xd9", end) == -1
        i = end
    return True  # the file ends inside its headers


def _png_is_truncated(data: bytes) -> bool:
    """True when a PNG's chunks, walked by their lengths, end before the IEND chunk."""
    i = 8
    while i + 8 <= len(data):
        length = int.from_bytes(data[i : i + 4], "big")
        if data[i + 4 : i + 8] == b"IEND":
            return i + 12 > len(data)  # IEND carries no data, only its CRC
        i += 12 + length  # length, type, data, CRC
    return True


def _looks_truncated(data: bytes) -> bool:
    """True when a PNG or JPEG byte string ends before its end marker (a partial write or copy).

    OpenCV decodes a truncated JPEG into a grey-padded image with only a warning, so the end
    markers are checked here. Data after the end marker (a camera's trailer) is not truncation.
    """
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_is_truncated(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png_is_truncated(data)
    return False


def decode_image(source: Path | str | bytes, *, name: str | None = None) -> np.ndarray:
    """Decode an image file or encoded bytes into an OpenCV array (uint8, HxW grey or HxWx3 BGR).

    16-bit images are scaled to 8 bits; an alpha channel is dropped. Raises ImageReadError naming
    the file (or ``name``) when it is missing, not a decodable image, or truncated.
    """
    cv2 = _cv2()
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ImageReadError(f"cannot read image {label}: {exc.strerror or exc}") from None
    if not data:
        raise ImageReadError(f"cannot read image {label}: the file is empty")
    if _looks_truncated(data):
        raise ImageReadError(f"cannot read image {label}: the file is truncated (no end marker)")
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # e.g. over OpenCV's pixel limit (CV_IO_MAX_IMAGE_PIXELS, 2^30 by default)
        why = str(exc).strip().splitlines()[-1]
        if "CV_IO_MAX_IMAGE_PIXELS" in why:
            why = "more pixels than OpenCV decodes, CV_IO_MAX_IMAGE_PIXELS (2^30 by default); scale or tile it first"
        raise ImageReadError(f"cannot read image {label}: {why}") from None
    if img is None or img.size == 0:
        raise ImageReadError(f"cannot read image {label}: not a decodable PNG/JPEG/BMP/TIFF image")
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageReadError(f"cannot read image {label}: unsupported pixel type {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    elif img.ndim != 2 and not (img.ndim == 3 and img.shape[2] == 3):
        raise ImageReadError(f"cannot read image {label}: unsupported shape {img.shape}")
    return np.ascontiguousarray(img)


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to ``height`` x ``width``: INTER_AREA halvings while >= 2x the target, then INTER_LINEAR."""
    cv2 = _cv2()
    h, w = img.shape[:2]
    while h >= 2 * height and w >= 2 * width:
        h, w = h // 2, w // 2
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    if (h, w) != (height, width):
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
    return img


def prepare_uint8(img: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Geometry and colour: an OpenCV image (HxW grey or HxWx3 BGR, uint8) -> uint8 CxHxW per ``spec``."""
    cv2 = _cv2()
    out = resize(img, spec.height, spec.width)
    if spec.channels == 1:
        if out.ndim == 3:
            out = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY)
        return out[None, :, :].copy()
    if out.ndim == 2:
        out = cv2.cvtColor(out, cv2.COLOR_GRAY2BGR)
    elif spec.colour_order == "RGB":
        out = cv2.cvtColor(out, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def to_float(chw_uint8: np.ndarray) -> np.ndarray:
    """uint8 (..., C, H, W) -> float32 in [0, 1], same shape."""
    return chw_uint8.astype(np.float32) * np.float32(1.0 / 255.0)


def preprocess(img: np.ndarray, spec: InputSpec) -> np.ndarray:
    """An OpenCV image -> float32 CxHxW in [0, 1]: the model input for one image (add N yourself)."""
    return to_float(prepare_uint8(img, spec))


def load_image(path: Path | str, spec: InputSpec) -> np.ndarray:
    """Decode ``path`` and preprocess it: float32 CxHxW in [0, 1]. Raises ImageReadError naming the file."""
    return preprocess(decode_image(path), spec)
