"""Training and evaluation on real MNIST: tiny models learn, resume is exact, bad input is refused cleanly."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from trainer.eval_run import evaluate_run
from trainer.train import TrainOptions, train

# Digit 1 is the easy one-class MNIST digit for reconstruction models.
EASY_DIGIT = "1"  # the normal class of the conftest fixture mnist_easy
TINY = {"base_channels": 16, "latent": 32}


def cli(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def mnist_small(mnist_easy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 real training images of the easy digit (and no test split): for quick runs."""
    out = tmp_path_factory.mktemp("data") / "mnist-small"
    (out / "train" / "good").mkdir(parents=True)
    for p in sorted((mnist_easy / "train" / "good").iterdir())[:600]:
        shutil.copy(p, out / "train" / "good" / p.name)
    return out


@pytest.mark.parametrize(("model", "epochs", "min_auroc"), [("ae", 3, 0.98), ("ganomaly", 3, 0.95)])
def test_tiny_model_learns_an_easy_digit(
    model: str, epochs: int, min_auroc: float, mnist_easy: Path, tmp_path: Path
) -> None:
    run = tmp_path / model
    result = train(TrainOptions(model=model, data=mnist_easy, out=run, epochs=epochs, device="cpu", model_options=TINY))
    steps = epochs * (json.loads((run / "config.json").read_text())["n_train"] // 64)
    assert steps >= 250, steps  # "a few hundred steps"
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs_logged = [r for r in log if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs_logged] == list(range(1, epochs + 1))
    assert all(all(v == v and abs(v) < 1e6 for v in r["losses"].values()) for r in epochs_logged)
    assert result.best_val_loss == min(r["val_loss"] for r in epochs_logged)

    metrics = evaluate_run(run, mnist_easy, device="cpu")
    assert metrics["n_normal"] == 1135 and metrics["n_anomalous"] == 10000 - 1135
    assert metrics["auroc"] >= min_auroc, metrics
    assert set(metrics["per_defect_auroc"]) == {f"digit_{d}" for d in range(10) if str(d) != EASY_DIGIT}
    for name in ("metrics.json", "roc.png", "extremes.png"):
        assert (run / "eval" / name).stat().st_size > 0
    if model == "ae":  # the command line names the folder it wrote, per checkpoint
        out = cli("eval", run, "--data", mnist_easy, "--checkpoint", "last", "--device", "cpu")
        assert out.returncode == 0, out.stderr
        assert f"plots: {run / 'eval-last'}\n" in out.stderr, out.stderr
        assert (run / "eval-last" / "roc.png").stat().st_size > 0


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# Small widths per model (the models' own unit-test sizes), so that each resume test takes seconds.
RESUME_SIZES: dict[str, dict[str, int]] = {
    "ae": TINY,
    "ganomaly": TINY,
    "ede": {"base_channels": 8, "latent": 16},
    "oclr": {"base_channels": 8, "latent": 16},
    "cbigan": {"base_channels": 2, "latent": 16, "d_z_width": 32},
    "alcn": {"base_channels": 4, "latent": 16},
}


@pytest.mark.parametrize("model", list(RESUME_SIZES))
def test_resume_after_ctrl_c_gives_the_same_weights(model: str, mnist_small: Path, tmp_path: Path) -> None:
    """Every model's state survives an interruption: all optimisers, EMA, step counters, RNG, centre.

    33 batches per epoch (540 of 600 images, batch 16): an epoch ends mid-way through cbigan's 6-step
    cycle and its 10-step EMA period, so a counter not restored would change the weights.
    """
    args = [
        "train",
        "--model",
        model,
        "--data",
        mnist_small,
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--seed",
        "7",
        *sum((["--set", f"{k}={v}"] for k, v in RESUME_SIZES[model].items()), []),
    ]
    straight = cli(*args, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr

    run = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", *map(str, args), "--out", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # during epoch 2
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "run the same command again to resume" in stderr
    events = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[-1] == "interrupted"

    resumed = cli(*args, "--out", run)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    a, b = _weights(tmp_path / "straight" / "checkpoints" / "last.pt"), _weights(last)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _one_line_error(res: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith(("error:", "missing capability:"))]
    assert len(errors) == 1, res.stderr  # one line, even for long paths (no wrapping)
    for needle in needles:
        assert needle in errors[0], res.stderr


def test_bad_inputs_get_one_clear_line(mnist_small: Path, tmp_path: Path, shared_data: Path) -> None:
    base = ["--epochs", "1", "--device", "cpu"]
    _one_line_error(
        cli("train", "--model", "ae", "--data", tmp_path / "nowhere", "--out", tmp_path / "r", *base),
        2,
        "nowhere",
        "does not exist",
    )
    empty = tmp_path / "empty"
    (empty / "train" / "good").mkdir(parents=True)
    _one_line_error(
        cli("train", "--model", "ae", "--data", empty, "--out", tmp_path / "r", *base),
        2,
        "train/good",
        "no images",
    )
    _one_line_error(
        cli("train", "--model", "nope", "--data", mnist_small, "--out", tmp_path / "r", *base),
        2,
        "unknown model 'nope'",
    )
    _one_line_error(
        cli(
            "train",
            "--model",
            "ae",
            "--data",
            mnist_small,
            "--out",
            tmp_path / "r",
            "--image-size",
            "100",
            *base,
        ),
        2,
        "cannot take image size 100",
    )

    broken = tmp_path / "broken"
    shutil.copytree(mnist_small, broken)
    src = sorted((shared_data / "magnetic_tile" / "train" / "good").iterdir())[0]
    data = src.read_bytes()
    (broken / "train" / "good" / "cut.jpg").write_bytes(data[: len(data) // 2])
    _one_line_error(
        cli("train", "--model", "ae", "--data", broken, "--out", tmp_path / "r2", *base),
        2,
        "cut.jpg",
        "truncated",
    )

    ok = cli(
        "train",
        "--model",
        "ae",
        "--data",
        mnist_small,
        "--out",
        tmp_path / "run",
        *base,
        "--set",
        "base_channels=8",
        "--set",
        "latent=8",
    )
    assert ok.returncode == 0, ok.stderr
    _one_line_error(
        cli("train", "--model", "ae", "--data", mnist_small, "--out", tmp_path / "run", *base, "--set", "loss=ssim"),
        2,
        "other model settings (loss='l2')",
    )
    _one_line_error(
        cli("train", "--model", "ganomaly", "--data", mnist_small, "--out", tmp_path / "run", *base),
        2,
        "already holds a different run",
        "model",
    )
    # A run started by another revision of the model's code is not resumed into a mix of the two.
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model_revision"] == 1
    (tmp_path / "run" / "config.json").write_text(json.dumps({**config, "model_revision": 2}))
    _one_line_error(
        cli("train", "--model", "ae", "--data", mnist_small, "--out", tmp_path / "run", *base),
        2,
        "revision 2 of 'ae'",
        "another --out",
    )
    _one_line_error(cli("eval", tmp_path / "run", "--data", mnist_small), 2, "test")
    good_only = tmp_path / "good-only"  # a test split with normal images only: no AUROC, said before scoring
    shutil.copytree(mnist_small, good_only)
    (good_only / "test" / "good").mkdir(parents=True)
    for image in sorted((good_only / "train" / "good").iterdir())[:5]:
        shutil.copy(image, good_only / "test" / "good")
    _one_line_error(cli("eval", tmp_path / "run", "--data", good_only), 2, "has no anomalous images", "test/<defect>/")
    _one_line_error(cli("eval", tmp_path / "no-run"), 2, "does not exist")
    if not torch.cuda.is_available():
        _one_line_error(
            cli("train", "--model", "ae", "--data", mnist_small, "--out", tmp_path / "r3", "--device", "cuda"),
            3,
            "no CUDA GPU",
        )


def test_cpu_training_is_deterministic(mnist_small: Path, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        opts = TrainOptions(
            model="ae",
            data=mnist_small,
            out=tmp_path / name,
            epochs=1,
            batch_size=32,
            device="cpu",
            seed=3,
            model_options=TINY,
        )
        train(opts)
        runs.append(_weights(tmp_path / name / "checkpoints" / "last.pt"))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_divergence_and_an_unusable_out_are_one_line(mnist_small: Path, tmp_path: Path) -> None:
    """A NaN loss used to run on to exit 0 with NaN in metrics.jsonl and no best.pt; now training stops at once, exit
    1, naming where. An --out that cannot be a folder was a traceback after every image had been decoded."""
    few = tmp_path / "few"  # 40 images: 4 held out, too few for export's default target, which train says at once
    (few / "train" / "good").mkdir(parents=True)
    for p in sorted((mnist_small / "train" / "good").iterdir())[:40]:
        shutil.copy(p, few / "train" / "good" / p.name)
    diverged = cli(
        "train", "--model", "ae", "--data", few, "--out", tmp_path / "nan", "--epochs", "2",
        "--image-size", "16", "--batch-size", "8", "--lr", "1e12", "--device", "cpu",
    )  # fmt: skip
    _one_line_error(
        diverged, 1, "training diverged at epoch 1, batch", "nan", "no checkpoint", "a new --out with a lower --lr"
    )
    assert "note: 4 held-out normal image(s) can set a threshold for a false-alarm rate no lower than about 20.0%" in (
        diverged.stderr
    )
    events = [json.loads(line)["event"] for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert events[-1] == "diverged" and "epoch" not in events
    (tmp_path / "afile").write_text("")
    for out, needle in ((tmp_path / "afile", "is a file"), (tmp_path / "afile" / "run", "cannot create --out")):
        _one_line_error(cli("train", "--model", "ae", "--data", mnist_small, "--out", out, "--epochs", "1"), 2, needle)
    # a negative --lr (also on a resume, which skipped the model config's check) and an out-of-range --seed
    _one_line_error(
        cli("train", "--model", "ae", "--data", mnist_small, "--out", tmp_path / "r", "--lr", "-1"), 2, "--lr"
    )
    for seed in ("-1", "99999999999999999999"):
        res = cli("train", "--model", "ae", "--data", mnist_small, "--out", tmp_path / "r", "--seed", seed)
        assert res.returncode == 2 and "Traceback" not in res.stderr and "--seed" in res.stderr, res.stderr


def test_a_resume_on_changed_training_images_is_refused(mnist_small: Path, tmp_path: Path) -> None:
    """A training image swapped between two sessions of one run (not a held-out one, which was already checked) used
    to resume silently: one model trained on two data sets."""
    data = tmp_path / "data"
    shutil.copytree(mnist_small, data)
    args = [
        "train",
        "--model",
        "ae",
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--image-size",
        "16",
        "--device",
        "cpu",
    ]
    first = cli(*args, "--epochs", "1")
    assert first.returncode == 0, first.stderr
    # another --seed (which also picks other held-out images) is named as such, not blamed on the files
    _one_line_error(cli(*args, "--epochs", "2", "--seed", "5"), 2, "already holds a different run (seed differ)")
    images = sorted((data / "train" / "good").iterdir())
    images[0].write_bytes(images[1].read_bytes())
    _one_line_error(cli(*args, "--epochs", "2"), 2, "are not those", "started with", "another --out")


def test_a_finished_run_given_fewer_epochs_keeps_its_own(mnist_small: Path, tmp_path: Path) -> None:
    """The same command with a smaller --epochs on a run that trained more used to rewrite config.json to the smaller
    number (export then put it in the bundle) and say the run had trained that many."""
    args = ["train", "--model", "ae", "--data", mnist_small, "--out", tmp_path / "run", "--image-size", "16"]
    assert cli(*args, "--epochs", "2", "--device", "cpu").returncode == 0
    again = cli(*args, "--epochs", "1", "--device", "cpu")
    assert again.returncode == 0, again.stderr
    assert "has already trained 2 epoch(s); pass --epochs 3 or more to train on" in again.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 2


def test_pixel_auroc_leaves_out_anomalous_images_without_a_mask(
    shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An anomalous test image whose mask is missing (here: misnamed) used to count as all-normal pixels, silently
    lowering pixel AUROC. It is now left out, with a note, and the misnamed mask file is named in a warning: the
    figure equals the one on the folder without that image."""
    from trainer.datasets.folder import scan_folder

    src = scan_folder(shared_data / "bsdata_pitting")
    data = tmp_path / "data"
    for s in [*src.train[:24], *[t for t in src.test if t.label == 0][:3], *[t for t in src.test if t.label == 1][:4]]:
        part = "train" if s in src.train else "test"
        (data / part / s.defect).mkdir(parents=True, exist_ok=True)
        shutil.copy(s.path, data / part / s.defect / s.path.name)
        if s.mask is not None:
            (data / "ground_truth" / s.defect).mkdir(parents=True, exist_ok=True)
            shutil.copy(s.mask, data / "ground_truth" / s.defect / s.mask.name)
    run = tmp_path / "run"
    opts = TrainOptions(model="ae", data=data, out=run, epochs=1, batch_size=8, image_size=32, device="cpu")
    train(replace(opts, model_options=TINY))
    without = tmp_path / "without"
    shutil.copytree(data, without)
    first = sorted((data / "test" / "pitting").iterdir())[0]
    (without / "test" / "pitting" / first.name).unlink()
    (without / "ground_truth" / "pitting" / f"{first.stem}_mask.png").unlink()
    mask = data / "ground_truth" / "pitting" / f"{first.stem}_mask.png"
    mask.rename(mask.with_name(f"{first.stem}.png"))  # a common naming slip
    with caplog.at_level("WARNING", logger="trainer.datasets.folder"):
        misnamed = evaluate_run(run, data, device="cpu")
    assert "1 mask file(s) match no test image" in caplog.text and f"pitting/{first.stem}.png" in caplog.text
    reference = evaluate_run(run, without, device="cpu")
    assert misnamed["pixel_auroc"] == pytest.approx(reference["pixel_auroc"], abs=1e-9)
    assert (misnamed["n_anomalous"], reference["n_anomalous"]) == (4, 3)  # image metrics still count it


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(mnist_small: Path, tmp_path: Path) -> None:
    """Two Ctrl-C in quick succession: the second one stops at once, but never in the middle of writing a checkpoint
    (torch.save then raised its own RuntimeError: a traceback and exit 1). Exit 130, one line, and last.pt whole."""
    run = tmp_path / "run"
    args = ["train", "--model", "ae", "--data", mnist_small, "--out", run, "--epochs", "50", "--device", "cpu"]
    args += ["--set", "base_channels=64"]  # a checkpoint of some MB: a write that takes a while
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    last = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    inode = last.stat().st_ino
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 60  # the second one while the interruption's checkpoint is being written
    while proc.poll() is None and time.monotonic() < deadline:
        if any(p.name.startswith(".last.pt.") for p in last.parent.iterdir()) or last.stat().st_ino != inode:
            break
        time.sleep(0.0005)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert torch.load(last, weights_only=False)["model_name"] == "ae"
    events = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[-1] == "interrupted", events
