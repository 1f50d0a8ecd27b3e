"""Telling a binary module built against NumPy 1.x, failing to import under NumPy 2, from any other import failure.

JetPack 6's OpenCV and TensorRT bindings are such builds; pip puts NumPy 2 into a venv that asks for a newer NumPy
than the system's. Their import then fails with "numpy.core.multiarray failed to import" after a multi-line NumPy
warning on stderr: callers import with stderr redirected and pass what was written here.
"""

from __future__ import annotations


def numpy1_build_problem(exc: ImportError, stderr_text: str) -> str | None:
    """The words for ``exc`` when it is a NumPy 1.x build under NumPy 2, with the fix; None for any other failure."""
    if "numpy" not in f"{exc} {stderr_text}".lower():
        return None
    import numpy

    return f"it was built against NumPy 1.x and this environment has NumPy {numpy.__version__}: install 'numpy<2'"
