"""Make a usable copy of the tensorrt-stubs package for mypy: `python scripts/trt_stubs.py OUT_DIR`.

tensorrt-stubs (10.13.0.35.1) installs `tensorrt/` and `tensorrt_bindings/` stub folders without a
py.typed marker (so mypy silently treats `tensorrt` as Any), and its generated tensorrt.pyi has two
kinds of syntax error: parameters named `in` (a keyword) and a non-default parameter after
defaults (`add_scale_nd(..., channel_axis: int)`). This copies both folders to OUT_DIR with those
lines repaired, so that `MYPYPATH=OUT_DIR mypy deploy` checks our TensorRT calls against the real
API. The repair touches only signatures we never call; errors inside the stubs themselves are
silenced by pyproject's mypy override for the tensorrt modules.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path


def main() -> None:
    out = Path(sys.argv[1])
    spec = importlib.util.find_spec("tensorrt_stubs")
    if spec is None or spec.origin is None:
        sys.exit("tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs")
    site = Path(spec.origin).parent.parent
    shutil.rmtree(out, ignore_errors=True)
    for name in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(site / name, out / name)
    pyi = out / "tensorrt_bindings" / "tensorrt.pyi"
    text = pyi.read_text()
    text = re.sub(r"([(,] ?)in: ", r"\1in_: ", text)
    text = text.replace("power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = ...)")
    pyi.write_text(text)
    print(f"tensorrt stubs ready in {out}")


if __name__ == "__main__":
    main()
