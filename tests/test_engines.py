"""deploy.engines without TensorRT: keys, sidecars, mismatch reasons, lookup, device probing, and the
clear TensorRTUnavailable / exit 3 where TensorRT or a GPU is missing.

Nothing here pretends TensorRT ran: building and running engines is only exercised where TensorRT
and a GPU exist (the tests that need them skip otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import engines
from deploy.engines import (
    DeviceInfo,
    EngineMismatch,
    EngineSidecar,
    TensorRTUnavailable,
    build_engine,
    compile_bundle,
    compile_main,
    engine_key,
    find_engine,
    parse_engine_key,
    probe_device,
    prune_engine_cache,
    read_l4t_release,
    read_sidecar,
    sidecar_mismatch,
)

SHA = "3fa2c94e0b1d7a6f" + "0123456789abcdef" * 3
KEY = f"{SHA[:16]}-trt10.3.0-sm87-fp16-b8"
JETSON = DeviceInfo(
    tensorrt_version="10.3.0", cuda_version="12.6", compute_capability="8.7", gpu_name="Orin", l4t_release="36.4.0"
)
HAS_TRT = engines.trt is not None and probe_device().compute_capability is not None


def _sidecar(**changes: object) -> EngineSidecar:
    base = EngineSidecar(
        key=KEY,
        onnx_sha256=SHA,
        tensorrt_version="10.3.0",
        cuda_version="12.6",
        l4t_release="36.4.0",
        compute_capability="8.7",
        precision="fp16",
        min_batch=1,
        opt_batch=8,
        max_batch=8,
        input_shape=[-1, 1, 32, 32],
        output_shapes={"score": [-1], "map": [-1, 1, 32, 32]},
        built_at="2024-05-01T12:00:00Z",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- cache


def test_prune_engine_cache_keeps_only_the_named_models(tmp_path: Path) -> None:
    other = "a" * 64
    kept = [f"{KEY}.plan", f"{KEY}.json", f"{SHA[:16]}-trt10.3.0-sm87-fp32-b1.plan"]
    gone = [f"{other[:16]}-trt10.3.0-sm87-fp16-b8.plan", f"{other[:16]}-trt10.3.0-sm87-fp16-b8.json"]
    strangers = ["notes.plan", "model.onnx", ".x.plan.123.tmp"]  # not engine keys: never touched
    for name in kept + gone + strangers:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "ort-trt").mkdir()  # ONNX Runtime's own cache
    removed = prune_engine_cache(tmp_path, [SHA])
    assert [p.name for p in removed] == sorted(gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + strangers + ["ort-trt"])
    assert prune_engine_cache(tmp_path / "absent", [SHA]) == []
    assert len(prune_engine_cache(tmp_path, [])) == len(kept)  # nothing kept: every engine goes


def test_prune_engine_cache_drops_engines_of_another_tensorrt_or_gpu(tmp_path: Path) -> None:
    """After a JetPack upgrade the kept model's engines for the old TensorRT can never be found by key again: they
    used to stay on the eMMC until the model itself changed. Without a known TensorRT/GPU nothing is judged by it."""
    names = [
        f"{SHA[:16]}-trt{v}-sm{sm}-fp16-b8.{ext}"
        for v, sm in (("10.3.0", "87"), ("10.7.0", "87"), ("10.7.0", "72"))
        for ext in ("plan", "json")
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    unknown = dataclasses.replace(probe_device(), tensorrt_version=None)
    assert prune_engine_cache(tmp_path, [SHA], device=unknown) == []
    here = dataclasses.replace(probe_device(), tensorrt_version="10.7.0", compute_capability="8.7")
    removed = prune_engine_cache(tmp_path, [SHA], device=here)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n in names if "trt10.7.0-sm87" in n)
    assert len(removed) == 4


# ---------------------------------------------------------------------------------------------- keys


def test_engine_key_format_and_parse_round_trip() -> None:
    assert engine_key(SHA, "10.3.0", "8.7", "fp16", 8) == KEY
    assert engine_key(SHA, "10.3.0", "87", "fp16", 8) == KEY  # both spellings of the compute capability
    assert engine_key(SHA, "10.13.0.35", "9.0", "fp32", 1) == f"{SHA[:16]}-trt10.13.0.35-sm90-fp32-b1"
    assert engine_key(SHA, "10.3.0", "10.0", "fp32", 4).endswith("-sm100-fp32-b4")
    assert parse_engine_key(KEY) == {
        "sha16": SHA[:16],
        "trt_version": "10.3.0",
        "sm": "87",
        "precision": "fp16",
        "max_batch": 8,
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("abc", "10.3.0", "8.7", "fp16", 8), "onnx_sha256 must be 64 lowercase hex"),
        ((SHA.upper(), "10.3.0", "8.7", "fp16", 8), "onnx_sha256"),
        ((SHA, "10.x", "8.7", "fp16", 8), "TensorRT version"),
        ((SHA, "10.3.0/../..", "8.7", "fp16", 8), "TensorRT version"),
        ((SHA, "10.3.0", "sm87", "fp16", 8), "compute capability"),
        ((SHA, "10.3.0", "8.7", "int8", 8), "precision"),
        ((SHA, "10.3.0", "8.7", "fp16", 0), "max_batch"),
        ((SHA, "10.3.0", "8.7", "fp16", 5000), "max_batch"),
        ((SHA, "10.3.0", "8.7", "fp16", True), "max_batch"),
    ],
)
def test_engine_key_validates_each_part(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine_key(*args)


@pytest.mark.parametrize("bad", ["", "x.plan", KEY + ".plan", KEY.replace("-b8", "-b0"), "../" + KEY, KEY + "/"])
def test_parse_engine_key_refuses_non_keys(bad: str) -> None:
    with pytest.raises(ValueError, match="not an engine key"):
        parse_engine_key(bad)


# ------------------------------------------------------------------------------------------- sidecar


def test_sidecar_json_round_trip() -> None:
    sidecar = _sidecar()
    text = sidecar.to_json()
    assert json.loads(text)["key"] == KEY
    assert EngineSidecar.from_json(text) == sidecar
    no_l4t = _sidecar(l4t_release=None, cuda_version=None)
    assert EngineSidecar.from_json(no_l4t.to_json()) == no_l4t


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(extra=1), "unknown field"),
        (lambda d: d.pop("precision"), "lacks field"),
        (lambda d: d.update(max_batch="8"), "max_batch has the wrong type"),
        (lambda d: d.update(precision="int8"), "precision 'int8'"),
        (lambda d: d.update(min_batch=4, opt_batch=2), "batch range is inconsistent"),
        (lambda d: d.update(key="nope"), "not an engine key"),
        (lambda d: d.update(input_shape=[-1, "1", 32, 32]), "input_shape"),
        (lambda d: d.update(sidecar_version=2), "version 2"),
    ],
)
def test_sidecar_from_json_refuses_bad_content(mutate, message: str) -> None:
    data = json.loads(_sidecar().to_json())
    mutate(data)
    with pytest.raises(ValueError, match=message):
        EngineSidecar.from_json(json.dumps(data))
    with pytest.raises(ValueError, match="not JSON"):
        EngineSidecar.from_json("{")


def test_sidecar_matching_device_has_no_mismatch() -> None:
    assert sidecar_mismatch(_sidecar(), JETSON) is None
    assert sidecar_mismatch(_sidecar(), JETSON, onnx_sha256=SHA, precision="fp16", max_batch=4) is None


@pytest.mark.parametrize(
    ("sidecar_changes", "device_changes", "wanted", "reason"),
    [
        ({}, {"tensorrt_version": "10.7.0"}, {}, "engine built with TensorRT 10.3.0, this device has TensorRT 10.7.0"),
        ({}, {"tensorrt_version": None}, {}, "TensorRT is not installed on this device"),
        (
            {},
            {"compute_capability": "7.2", "gpu_name": "Xavier"},
            {},
            "compute capability 8.7, this GPU (Xavier) has 7.2",
        ),
        ({}, {"compute_capability": None}, {}, "no CUDA GPU found"),
        ({}, {"l4t_release": "36.3.0"}, {}, "engine built on L4T 36.4.0, this device is L4T 36.3.0"),
        ({}, {"l4t_release": None}, {}, "this device is not a Jetson"),
        ({}, {}, {"precision": "fp32"}, "engine precision is fp16, wanted fp32"),
        ({}, {}, {"max_batch": 16}, "engine accepts batches 1..8, wanted 1..16"),
        ({}, {}, {"onnx_sha256": "f" * 64}, "another model.onnx"),
        ({"key": KEY.replace("-b8", "-b4")}, {}, {}, "does not match its own fields"),
    ],
)
def test_sidecar_mismatch_reasons(sidecar_changes: dict, device_changes: dict, wanted: dict, reason: str) -> None:
    device = dataclasses.replace(JETSON, **device_changes)
    got = sidecar_mismatch(_sidecar(**sidecar_changes), device, **wanted)
    assert got is not None and reason in got


def test_sidecar_built_on_x86_does_not_match_a_jetson() -> None:
    x86 = _sidecar(l4t_release=None)
    reason = sidecar_mismatch(x86, JETSON)
    assert reason == "engine built on a non-Jetson system, this device is L4T 36.4.0"


def test_read_sidecar_checks_name_and_presence(tmp_path: Path) -> None:
    plan = tmp_path / f"{KEY}.plan"
    plan.write_bytes(b"plan")
    with pytest.raises(EngineMismatch, match="has no sidecar"):
        read_sidecar(plan)
    plan.with_suffix(".json").write_text(_sidecar().to_json())
    assert read_sidecar(plan) == _sidecar()
    other = tmp_path / f"{KEY.replace('-b8', '-b4')}.plan"
    other.with_suffix(".json").write_text(_sidecar().to_json())
    with pytest.raises(EngineMismatch, match="is for key"):
        read_sidecar(other)


# -------------------------------------------------------------------------------------------- lookup


def _put_engine(folder: Path, key: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / f"{key}.plan"
    plan.write_bytes(b"engine bytes")
    plan.with_suffix(".json").write_text("{}")
    return plan


def test_find_engine_prefers_shipped_then_cache(tmp_path: Path) -> None:
    bundle, cache = tmp_path / "bundle", tmp_path / "cache"
    bundle.mkdir()
    assert find_engine(bundle, cache, KEY) is None
    cached = _put_engine(cache, KEY)
    assert find_engine(bundle, cache, KEY) == cached
    assert find_engine(bundle, None, KEY) is None
    shipped = _put_engine(bundle / "engines", KEY)
    assert find_engine(bundle, cache, KEY) == shipped


def test_find_engine_key_must_match_exactly(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    _put_engine(bundle / "engines", KEY.replace("-b8", "-b16"))
    _put_engine(bundle / "engines", KEY.replace("-fp16-", "-fp32-"))
    _put_engine(bundle / "engines", KEY.replace("trt10.3.0", "trt10.3.1"))
    assert find_engine(bundle, None, KEY) is None
    assert find_engine(bundle, None, KEY.replace("-b8", "-b16")) is not None
    with pytest.raises(ValueError, match="not an engine key"):
        find_engine(bundle, None, "../" + KEY)


def test_find_engine_ignores_a_plan_without_sidecar(tmp_path: Path) -> None:
    plan = _put_engine(tmp_path / "bundle" / "engines", KEY)
    plan.with_suffix(".json").unlink()
    cached = _put_engine(tmp_path / "cache", KEY)
    assert find_engine(tmp_path / "bundle", tmp_path / "cache", KEY) == cached


# -------------------------------------------------------------------------------------------- device


def test_probe_device_does_not_crash_and_reports_absence() -> None:
    info = probe_device()
    for f in dataclasses.fields(info):
        value = getattr(info, f.name)
        assert value is None or isinstance(value, str), f.name
    assert (info.tensorrt_version is None) == (engines.trt is None)
    if engines.trt is None:
        assert "the tensorrt Python module" in " ".join(info.missing())
    if info.compute_capability is None:
        assert info.gpu_name is None
        assert "a CUDA GPU" in " ".join(info.missing())
    else:
        engines.sm_tag(info.compute_capability)  # a well-formed capability


def test_read_l4t_release(tmp_path: Path) -> None:
    f = tmp_path / "nv_tegra_release"
    f.write_text("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: ...\n")
    assert read_l4t_release(f) == "36.4.0"
    assert read_l4t_release(tmp_path / "absent") is None
    f.write_text("garbage\n")
    assert read_l4t_release(f) is None


def test_unavailable_message_names_what_is_missing() -> None:
    none = DeviceInfo(None, None, None, None, None)
    with pytest.raises(TensorRTUnavailable, match="the tensorrt Python module .* and a CUDA GPU"):
        engines.require_tensorrt(none)
    with pytest.raises(TensorRTUnavailable, match=r"missing a CUDA GPU \("):
        engines.require_tensorrt(dataclasses.replace(JETSON, compute_capability=None))
    with pytest.raises(TensorRTUnavailable, match=r"missing the tensorrt Python module \(not installed\)$"):
        engines.require_tensorrt(dataclasses.replace(JETSON, tensorrt_version=None))
    assert engines.require_tensorrt(JETSON) is JETSON


@pytest.mark.skipif(HAS_TRT, reason="TensorRT and a GPU are present here")
def test_an_installed_tensorrt_that_fails_to_import_is_not_called_absent(tmp_path: Path) -> None:
    """A device whose tensorrt module is there but cannot load (its libnvinfer gone after a partial JetPack upgrade,
    or a build against NumPy 1.x under NumPy 2) gets that reason, not "not installed". The broken module is a
    package on PYTHONPATH that raises what TensorRT's own __init__ raises when libnvinfer cannot be opened."""
    broken = tmp_path / "tensorrt"
    broken.mkdir()
    (broken / "__init__.py").write_text(
        'raise ImportError("libnvinfer.so.10: cannot open shared object file: No such file or directory")\n'
    )
    code = "from deploy.engines import probe_device; print(probe_device().missing()[0])"

    def first_missing(pythonpath: str | None) -> str:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | (
            {"PYTHONPATH": pythonpath} if pythonpath else {}
        )
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and not out.stderr, out.stderr
        return out.stdout.strip()

    assert first_missing(str(tmp_path)) == (
        "a working tensorrt Python module (it is installed but fails to import: libnvinfer.so.10: cannot open shared "
        "object file: No such file or directory)"
    )
    assert first_missing(None) == "the tensorrt Python module (not installed)"


@pytest.mark.skipif(HAS_TRT, reason="TensorRT and a GPU are present here")
def test_build_and_compile_raise_unavailable_naming_the_missing_part(tmp_path: Path) -> None:
    expected = " and ".join(probe_device().missing())
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"not used: TensorRT is checked first")
    with pytest.raises(TensorRTUnavailable, match="TensorRT cannot run here: missing") as err:
        build_engine(onnx, tmp_path / "engines", precision="fp16", max_batch=4)
    assert expected in str(err.value)
    with pytest.raises(TensorRTUnavailable, match="missing"):
        compile_bundle(tmp_path, precision="fp32", max_batch=4)
    with pytest.raises(TensorRTUnavailable, match="missing"):
        engines.tensorrt_runner(tmp_path / f"{KEY}.plan")
    assert not (tmp_path / "engines").exists()


@pytest.mark.skipif(HAS_TRT, reason="TensorRT and a GPU are present here")
def test_compile_main_exit_3_without_tensorrt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert compile_main(tmp_path, "fp16", 8, None) == 3
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT cannot run here: missing")
    # a typo is a typo on any machine: bad arguments and a missing bundle are exit 2 before TensorRT is looked for
    assert compile_main(tmp_path, "int8", 8, None) == 2
    assert "--precision must be fp16 or fp32, got 'int8'" in capsys.readouterr().err
    assert compile_main(tmp_path, "fp16", 0, None) == 2
    assert compile_main(tmp_path / "nosuch", "fp16", 8, None) == 2
    assert f"no bundle at {tmp_path / 'nosuch'}" in capsys.readouterr().err


def test_build_engine_validates_arguments_first(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="precision"):
        build_engine(tmp_path / "m.onnx", tmp_path, precision="int8", max_batch=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_batch"):
        build_engine(tmp_path / "m.onnx", tmp_path, precision="fp16", max_batch=0)
