"""The golden parity gate (deploy.parity) on a real exported model and real images.

A tiny AE (trainer.models) is exported to ONNX the way the exporter does (legacy exporter,
opset 17, input "x", outputs "score"/"map", dynamic batch); its torch outputs on real
magnetic-tile images are the golden set, and ONNX Runtime must reproduce them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from deploy.manifest import Calibration, GoldenSpec, InputSpecModel, Manifest
from deploy.parity import (
    FP16_SCORE_RTOL,
    GoldenError,
    ParityReport,
    Tolerances,
    check_parity,
    check_parity_arrays,
    load_golden,
    onnxruntime_runner,
)
from deploy.preprocess import InputSpec, decode_image, preprocess

torch = pytest.importorskip("torch")

SIZE = 32
N_IMAGES = 6
FP32 = Tolerances(score_rtol=1e-4, score_atol=1e-6, map_atol=1e-5)


@pytest.fixture(scope="module")
def exported(shared_data: Path, one_torch_thread: None, tmp_path_factory) -> dict:
    """A real exported AE + golden arrays (torch outputs on real images), written as a bundle's golden/."""
    from trainer.models import build_config, build_model

    good = sorted((shared_data / "magnetic_tile" / "train" / "good").glob("*.jpg"))[:N_IMAGES]
    assert len(good) == N_IMAGES
    spec = InputSpec(height=SIZE, width=SIZE, channels=1)
    inputs = np.stack([preprocess(decode_image(p), spec) for p in good]).astype(np.float32)

    torch.manual_seed(0)
    model = build_model("ae", build_config("ae", image_size=SIZE, channels=1, base_channels=4, latent=8)).eval()
    with torch.no_grad():
        score, amap = model(torch.from_numpy(inputs))
    root = tmp_path_factory.mktemp("bundle")
    onnx_path = root / "model.onnx"
    torch.onnx.export(
        model,
        (torch.from_numpy(inputs[:1]),),
        str(onnx_path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["score", "map"],
        dynamic_axes={"x": {0: "B"}, "score": {0: "B"}, "map": {0: "B"}},
    )
    (root / "golden").mkdir()
    scores = score.numpy().astype(np.float32)
    maps = amap.numpy().astype(np.float32)
    np.save(root / "golden" / "inputs.npy", inputs)
    np.save(root / "golden" / "scores.npy", scores)
    np.save(root / "golden" / "maps.npy", maps)
    return {"root": root, "onnx": onnx_path, "inputs": inputs, "scores": scores, "maps": maps}


@pytest.fixture(scope="module")
def ort_run(exported: dict):
    return onnxruntime_runner(exported["onnx"])


def _manifest(n: int) -> Manifest:
    return Manifest(
        model={"name": "ae", "version": "test", "config": {}},
        created="2024-01-01T00:00:00Z",
        input=InputSpecModel(height=SIZE, width=SIZE, channels=1),
        outputs={"score": {"shape": ["B"], "dtype": "float32"}, "map": {"shape": ["B", 1, SIZE, SIZE]}},
        calibration=Calibration(
            method="quantile",
            target_false_alarm_rate=0.005,
            threshold=0.01,
            raw_min=0.0,
            raw_max=0.02,
            quantiles={"0.5": 0.005},
            n_images=n,
            source="test",
        ),
        training={"data": "x", "data_digest": "0" * 64, "n_train": 1, "n_val": n, "epochs": 1, "seed": 0},
        golden=GoldenSpec(n=n, labels=[0] * n, score_rtol=1e-4, score_atol=1e-6, map_atol=1e-5),
    )


def _check(run, exported: dict, tol: Tolerances = FP32, **kw) -> ParityReport:
    return check_parity_arrays(run, exported["inputs"], exported["scores"], exported["maps"], tol, **kw)


def test_onnxruntime_passes_on_real_export(exported: dict, ort_run) -> None:
    report = _check(ort_run, exported)
    assert report.ok, report.summary()
    assert report.reason is None and report.n == N_IMAGES
    assert report.max_score_rel <= 1e-4 and report.max_map_abs <= 1e-5
    assert "parity ok" in report.summary() and "6 golden images" in report.summary()
    # batched (2 batches of 4 and 2) gives the same verdict: the dynamic batch axis works
    assert _check(ort_run, exported, batch=4).ok


def test_bundle_wrapper_reads_golden_and_manifest_tolerances(exported: dict, ort_run) -> None:
    manifest = _manifest(N_IMAGES)
    inputs, scores, maps = load_golden(exported["root"], manifest)
    assert inputs.shape == (N_IMAGES, 1, SIZE, SIZE) and scores.shape == (N_IMAGES,)
    report = check_parity(ort_run, exported["root"], manifest, batch=5)
    assert report.ok, report.summary()
    assert (report.score_rtol, report.score_atol, report.map_atol) == (1e-4, 1e-6, 1e-5)


def test_golden_set_that_disagrees_with_manifest_is_a_bundle_error(exported: dict, ort_run) -> None:
    with pytest.raises(GoldenError, match=r"golden/inputs.npy holds 6 images, the manifest says 7"):
        check_parity(ort_run, exported["root"], _manifest(N_IMAGES + 1))


def test_perturbed_score_fails_with_figures(exported: dict, ort_run) -> None:
    scores = exported["scores"].copy()
    scores[2] *= 1.001  # 10x the fp32 rtol
    report = check_parity_arrays(ort_run, exported["inputs"], scores, exported["maps"], FP32)
    assert not report.ok
    assert "score differs" in report.reason and "image(s) 2 " in report.reason
    assert report.max_score_rel == pytest.approx(1e-3, rel=0.05)
    assert "FAILED" in report.summary()


def test_perturbed_map_fails(exported: dict, ort_run) -> None:
    maps = exported["maps"].copy()
    maps[4, 0, 3, 7] += 1e-3
    report = check_parity_arrays(ort_run, exported["inputs"], exported["scores"], maps, FP32)
    assert not report.ok and "map differs" in report.reason and "image(s) 4" in report.reason
    assert report.max_map_abs == pytest.approx(1e-3, rel=0.05)


def test_nan_output_fails(exported: dict, ort_run) -> None:
    def nan_run(x: np.ndarray):
        s, m = ort_run(x)
        s = s.copy()
        s[1] = np.nan
        return s, m

    report = _check(nan_run, exported)
    assert not report.ok and "NaN or inf" in report.reason and "golden image(s) 1" in report.reason
    assert math.isnan(report.max_score_abs)


def test_inf_in_map_fails(exported: dict, ort_run) -> None:
    def inf_run(x: np.ndarray):
        s, m = ort_run(x)
        m = m.copy()
        m[0, 0, 0, 0] = np.inf
        return s, m

    report = _check(inf_run, exported)
    assert not report.ok and "'map' has NaN or inf" in report.reason


def test_wrong_shape_fails(exported: dict, ort_run) -> None:
    report = _check(lambda x: (ort_run(x)[0], ort_run(x)[1][:, :, :16]), exported)
    assert (
        not report.ok
        and "'map' has shape (6, 1, 16, 32)" in report.reason
        and "expected (6, 1, 32, 32)" in report.reason
    )
    report = _check(lambda x: (ort_run(x)[0][:, None], ort_run(x)[1]), exported)
    assert not report.ok and "'score' has shape (6, 1)" in report.reason


def test_wrong_dtype_fails(exported: dict, ort_run) -> None:
    report = _check(lambda x: (ort_run(x)[0].astype(np.float64), ort_run(x)[1]), exported)
    assert not report.ok and "dtype float64, expected float32" in report.reason


def test_backend_exception_is_a_failure_not_a_crash(exported: dict) -> None:
    def broken(x: np.ndarray):
        raise RuntimeError("device lost")

    report = _check(broken, exported)
    assert not report.ok and report.reason == "backend raised RuntimeError: device lost"


def test_fp16_tolerance_accepts_fp16_sized_error_that_fp32_rejects(exported: dict, ort_run) -> None:
    # What an fp16 engine does: every output rounded through float16, plus a few-1e-3 relative drift.
    def fp16ish(x: np.ndarray):
        s, m = ort_run(x)
        return (s * np.float32(1.003)).astype(np.float16).astype(np.float32), m.astype(np.float16).astype(np.float32)

    fp32 = _check(fp16ish, exported, precision="fp32")
    assert not fp32.ok and "score differs" in fp32.reason
    fp16 = _check(fp16ish, exported, precision="fp16")
    assert fp16.ok, fp16.summary()
    assert fp16.score_rtol == FP16_SCORE_RTOL and fp16.precision == "fp16"
    # ... but fp16's tolerance is not a blank cheque: a 5% error still fails
    report = _check(lambda x: (ort_run(x)[0] * np.float32(1.05), ort_run(x)[1]), exported, precision="fp16")
    assert not report.ok and "score differs" in report.reason


def test_fp16_score_tolerance_follows_the_bundles_score_scale(exported: dict, ort_run) -> None:
    """A model whose scores are tiny (held-out span 8e-4, so the exporter's atol is 8e-8): an fp16 engine that is
    off by 1e-4 moves a normalised score by 0.12 and must fail; one off by 1e-3 of the span passes."""
    k = np.float32(4e-4) / np.float32(np.abs(exported["scores"]).max())  # the same model's scores, rescaled
    tol = Tolerances(score_rtol=1e-4, score_atol=8e-8, map_atol=1e-4)
    assert tol.for_precision("fp16").score_atol == pytest.approx(8e-6)

    def off_by(delta: float):
        return lambda x: (ort_run(x)[0] * k + np.float32(delta), ort_run(x)[1])

    def gate(delta: float):
        scores = (exported["scores"] * k).astype(np.float32)
        return check_parity_arrays(off_by(delta), exported["inputs"], scores, exported["maps"], tol, precision="fp16")

    assert gate(8e-7).ok, gate(8e-7).summary()
    report = gate(1e-4)
    assert not report.ok and "score differs" in report.reason


def test_tolerances_validated() -> None:
    with pytest.raises(ValueError, match="score_rtol"):
        Tolerances(score_rtol=-1.0, score_atol=0.0, map_atol=0.0)
    with pytest.raises(ValueError, match="map_atol"):
        Tolerances(score_rtol=0.0, score_atol=0.0, map_atol=float("nan"))
    # fp16 never tightens a looser manifest tolerance
    loose = Tolerances(score_rtol=0.1, score_atol=0.0, map_atol=0.5).for_precision("fp16")
    assert (loose.score_rtol, loose.map_atol) == (0.1, 0.5)


def test_bad_golden_files_name_the_file(tmp_path: Path, exported: dict) -> None:
    from deploy.parity import load_golden_files

    golden = tmp_path / "golden"
    golden.mkdir()
    np.save(golden / "inputs.npy", exported["inputs"])
    np.save(golden / "scores.npy", exported["scores"])
    with pytest.raises(GoldenError, match="golden/maps.npy is missing"):
        load_golden_files(golden)
    np.save(golden / "maps.npy", exported["maps"].astype(np.float64))
    with pytest.raises(GoldenError, match="golden/maps.npy has dtype float64"):
        load_golden_files(golden)
    np.save(golden / "maps.npy", exported["maps"][:, :, :8])
    with pytest.raises(GoldenError, match=r"golden/maps.npy has shape \(6, 1, 8, 32\)"):
        load_golden_files(golden)
    (golden / "scores.npy").write_bytes(b"not numpy")
    with pytest.raises(GoldenError, match="golden/scores.npy is not a readable"):
        load_golden_files(golden)
