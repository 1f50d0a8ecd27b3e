"""Detector bundles: write, verify, sign, pack and safely unpack, with real keys and real files.

Every tampering case must be refused with a message naming the cause; a malicious tar must be
refused without writing anything outside (or, in the end, inside) the target folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from deploy import __version__
from deploy.bundle import (
    BundleError,
    edit_bundle,
    manifest_sha256,
    open_bundle,
    pack_tar,
    refresh_files,
    safe_extract,
    sign_bundle,
    verify_bundle,
    verify_bundle_details,
    verify_tar_manifest,
    write_bundle,
)
from deploy.manifest import (
    SCHEMA_VERSION,
    Calibration,
    GoldenSpec,
    InputSpecModel,
    Manifest,
    canonical_bytes,
    parse_manifest,
    version_tuple,
)
from deploy.preprocess import InputSpec
from deploy.signing import generate_keypair, key_id, load_private_key, load_public_key, sign_manifest
from tests.bundle_factory import watch_unpacking

H = W = 8


def make_manifest(**overrides: object) -> Manifest:
    fields: dict[str, object] = {
        "model": {"name": "ae", "version": "ae-test-2024-01-01", "config": {"latent": 8}},
        "created": "2024-01-01T00:00:00Z",
        "input": InputSpecModel(height=H, width=W, channels=1),
        "outputs": {
            "score": {"shape": ["B"], "dtype": "float32"},
            "map": {"shape": ["B", 1, H, W], "dtype": "float32"},
        },
        "calibration": Calibration(
            method="quantile",
            target_false_alarm_rate=0.005,
            threshold=0.3,
            raw_min=0.1,
            raw_max=0.5,
            quantiles={"0.5": 0.2, "0.995": 0.3},
            n_images=4,
            source="held-out 10% of train/good (4 images)",
        ),
        "training": {"data": "/data/x", "data_digest": "0" * 64, "n_train": 36, "n_val": 4, "epochs": 1, "seed": 0},
        "golden": GoldenSpec(n=2, labels=[0, 0], score_rtol=1e-4, score_atol=1e-6, map_atol=1e-5),
    }
    fields.update(overrides)
    return Manifest.model_validate(fields)


def tiny_onnx() -> bytes:
    """A real ONNX graph with the bundle's interface: x [B,1,H,W] -> score [B], map [B,1,H,W].

    The bundle layer never interprets model.onnx, so without onnx (a device install) any bytes do.
    """
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        return b"\x08\x08model.onnx stand-in: the bundle layer does not parse it"

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 1, H, W])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["B"])
    amap = helper.make_tensor_value_info("map", TensorProto.FLOAT, ["B", 1, H, W])
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["map"]),
        helper.make_node("ReduceMean", ["map"], ["score"], axes=[1, 2, 3], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "tiny", [x], [score, amap])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys" / "line3")


@pytest.fixture
def other_keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys" / "other")


def bundle_files(tmp_path: Path) -> dict[str, Path | bytes]:
    rng = np.random.default_rng(0)
    inputs = rng.random((2, 1, H, W), dtype=np.float32)
    maps = inputs * inputs
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    np.save(src / "inputs.npy", inputs)
    return {
        "model.onnx": tiny_onnx(),
        "golden/inputs.npy": src / "inputs.npy",
        "golden/scores.npy": npy_bytes(maps.mean(axis=(1, 2, 3))),
        "golden/maps.npy": npy_bytes(maps),
    }


@pytest.fixture
def bundle(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    out = tmp_path / "bundles" / "ae-3"
    write_bundle(out, make_manifest(), bundle_files(tmp_path), keys[0])
    return out


# ----------------------------------------------------------------------------------- round trips


def test_write_and_verify_directory(bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()) == [
        "golden/inputs.npy",
        "golden/maps.npy",
        "golden/scores.npy",
        "manifest.json",
        "model.onnx",
        "signature",
    ]
    manifest = verify_bundle(bundle, [keys[1]])
    assert manifest.model["name"] == "ae"
    assert set(manifest.files) == {"model.onnx", "golden/inputs.npy", "golden/scores.npy", "golden/maps.npy"}
    for name, entry in manifest.files.items():
        data = (bundle / name).read_bytes()
        assert entry.size == len(data)
        assert entry.sha256 == hashlib.sha256(data).hexdigest()
    raw = (bundle / "manifest.json").read_bytes()
    assert raw == canonical_bytes(manifest)  # stored canonically
    assert parse_manifest(raw) == manifest
    details = verify_bundle_details(bundle, [keys[1]])
    assert details.key_id == key_id(load_public_key(keys[1]))
    assert details.manifest_sha256 == hashlib.sha256(raw).hexdigest()
    signature = json.loads((bundle / "signature").read_text())
    assert signature["algorithm"] == "ed25519" and signature["key_id"] == details.key_id
    # nothing left over from the atomic build
    assert [p.name for p in bundle.parent.iterdir()] == ["ae-3"]


def test_tar_round_trip_is_reproducible(bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    tar1, tar2 = tmp_path / "a.tar", tmp_path / "b.tar"
    pack_tar(bundle, tar1)
    os.utime(bundle / "model.onnx", (12345, 12345))  # mtimes must not matter
    pack_tar(bundle, tar2)
    assert tar1.read_bytes() == tar2.read_bytes()
    with tarfile.open(tar1) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) and "manifest.json" in names and "golden/maps.npy" in names
    assert not any(n.startswith(("/", "./", "bundle")) for n in names)  # contents, no top-level folder
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and (m.isfile() or m.isdir()) for m in members)
    manifest = verify_bundle(tar1, [keys[1]])
    assert manifest == verify_bundle(bundle, [keys[1]])
    with open_bundle(tar1) as root:
        extracted = root
        assert (root / "model.onnx").read_bytes() == (bundle / "model.onnx").read_bytes()
    assert not extracted.exists()  # the temporary extraction is removed


def test_tar_made_by_other_tools_with_dot_prefix_verifies(
    bundle: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    tar_path = tmp_path / "dot.tar"
    with tarfile.open(tar_path, "w") as tar:  # like `tar -C bundle -cf dot.tar .`
        tar.add(bundle, arcname=".")
    assert verify_bundle(tar_path, [keys[1]]).model["name"] == "ae"


def test_manifest_sha256_is_the_bundles_identity_in_every_form(
    bundle: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """The cheap identity (no verification) equals the verified one for a folder, our tar and another tool's tar."""
    expected = verify_bundle_details(bundle, [keys[1]]).manifest_sha256
    assert expected == hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    ours, dotted = tmp_path / "a.tar", tmp_path / "dot.tar"
    pack_tar(bundle, ours)
    with tarfile.open(dotted, "w") as tar:
        tar.add(bundle, arcname=".")
    assert manifest_sha256(bundle) == manifest_sha256(ours) == manifest_sha256(dotted) == expected
    bare = tmp_path / "bare.tar"
    with tarfile.open(bare, "w") as tar:
        tar.add(bundle / "model.onnx", arcname="model.onnx")
    with pytest.raises(BundleError, match="holds no manifest.json"):
        manifest_sha256(bare)
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BundleError, match="cannot read"):
        manifest_sha256(tmp_path / "junk.tar")
    with pytest.raises(BundleError, match="no manifest.json"):
        manifest_sha256(tmp_path)


def test_unsigned_bundle(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    out = tmp_path / "unsigned"
    write_bundle(out, make_manifest(), {"model.onnx": b"not interpreted here"}, None)
    assert not (out / "signature").exists()
    with pytest.raises(BundleError, match=r"bundle is unsigned \(no signature file\)"):
        verify_bundle(out, [keys[1]])
    assert verify_bundle(out, [], require_signature=False).files["model.onnx"].size == 20
    sign_bundle(out, keys[0])
    assert verify_bundle_details(out, [keys[1]]).key_id == key_id(load_public_key(keys[1]))


# ------------------------------------------------------------------------------------ tampering


def test_changed_file_is_named(bundle: Path, keys: tuple[Path, Path]) -> None:
    path = bundle / "golden" / "scores.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # same size, different bytes
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"file golden/scores\.npy was changed: its sha256 does not match"):
        verify_bundle(bundle, [keys[1]])
    path.write_bytes(bytes(data) + b"x")
    with pytest.raises(BundleError, match=r"file golden/scores\.npy was changed: \d+ bytes, the manifest says"):
        verify_bundle(bundle, [keys[1]])


def test_added_file_is_named(bundle: Path, keys: tuple[Path, Path]) -> None:
    (bundle / "engines").mkdir()
    (bundle / "engines" / "evil.plan").write_bytes(b"\0" * 16)
    with pytest.raises(BundleError, match=r"unexpected file engines/evil\.plan: not listed in the manifest"):
        verify_bundle(bundle, [keys[1]])


def test_removed_file_is_named(bundle: Path, keys: tuple[Path, Path]) -> None:
    (bundle / "golden" / "maps.npy").unlink()
    with pytest.raises(BundleError, match=r"file golden/maps\.npy listed in the manifest is missing"):
        verify_bundle(bundle, [keys[1]])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("untrusted", r"signed by an untrusted key"),
        ("unsigned", r"bundle is unsigned \(no signature file\)"),
        ("grown", r"file golden/scores\.npy was changed: \d+ bytes, the manifest says"),
        ("added", r"unexpected file engines/evil\.plan: not listed in the manifest"),
        ("removed", r"file golden/maps\.npy listed in the manifest is missing"),
    ],
)
def test_a_tar_is_judged_by_its_signed_manifest_before_anything_is_unpacked(
    bundle: Path,
    keys: tuple[Path, Path],
    other_keys: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    damage: str,
    message: str,
) -> None:
    """A tar nobody trusted signed, or whose members are not the files its manifest lists at the sizes it lists, is
    refused from its headers, manifest.json and signature alone: not one member is unpacked (the real unpacker is
    watched, not replaced). A same-size change of contents is found by the sha256 check after unpacking."""
    import deploy.bundle

    if damage == "untrusted":
        sign_bundle(bundle, other_keys[0])
    elif damage == "unsigned":
        (bundle / "signature").unlink()
    elif damage == "grown":
        (bundle / "golden" / "scores.npy").write_bytes((bundle / "golden" / "scores.npy").read_bytes() + b"x")
    elif damage == "added":
        (bundle / "engines").mkdir()
        (bundle / "engines" / "evil.plan").write_bytes(b"\0" * 16)
    else:
        (bundle / "golden" / "maps.npy").unlink()
    tar_path = tmp_path / "bundle.tar"
    pack_tar(bundle, tar_path)
    unpacked = watch_unpacking(monkeypatch, deploy.bundle)
    with pytest.raises(BundleError, match=message):
        verify_tar_manifest(tar_path, [keys[1]])
    with pytest.raises(BundleError, match=message):
        verify_bundle(tar_path, [keys[1]])
    assert unpacked == []


def test_a_same_size_change_in_a_tar_is_found_after_unpacking(
    bundle: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    path = bundle / "golden" / "scores.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    tar_path = tmp_path / "bundle.tar"
    pack_tar(bundle, tar_path)
    verify_tar_manifest(tar_path, [keys[1]])  # headers, manifest and signature are all as signed
    with pytest.raises(BundleError, match=r"file golden/scores\.npy was changed: its sha256 does not match"):
        verify_bundle(tar_path, [keys[1]])


def test_symlink_in_bundle_folder_is_refused(bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    target = tmp_path / "outside.bin"
    target.write_bytes((bundle / "model.onnx").read_bytes())
    (bundle / "model.onnx").unlink()
    (bundle / "model.onnx").symlink_to(target)
    with pytest.raises(BundleError, match=r"bundle contains a symlink model\.onnx"):
        verify_bundle(bundle, [keys[1]])


def test_manifest_edited_after_signing(bundle: Path, keys: tuple[Path, Path]) -> None:
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["calibration"]["threshold"] = 99.0  # e.g. to silence the detector
    (bundle / "manifest.json").write_bytes(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode())
    with pytest.raises(BundleError, match=r"signature does not verify: manifest changed or wrong key"):
        verify_bundle(bundle, [keys[1]])


def test_manifest_that_does_not_parse(bundle: Path, keys: tuple[Path, Path]) -> None:
    (bundle / "manifest.json").write_bytes(b'{"schema_version": 1, "files": ')
    with pytest.raises(BundleError, match=r"manifest\.json does not parse as JSON"):
        verify_bundle(bundle, [keys[1]])
    (bundle / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"bundle has no manifest\.json"):
        verify_bundle(bundle, [keys[1]])


def test_deeply_nested_json_is_refused_before_the_signature_is_checked(bundle: Path, keys: tuple[Path, Path]) -> None:
    """json.loads raises RecursionError (not a ValueError) on thousands of '[': it must become a refusal, not a
    traceback, even though nothing has been verified yet."""
    signature = (bundle / "signature").read_bytes()
    (bundle / "signature").write_bytes(b"[" * 60_000)
    with pytest.raises(BundleError, match=r"signature file does not parse as JSON"):
        verify_bundle(bundle, [keys[1]])
    (bundle / "signature").write_bytes(signature)
    (bundle / "manifest.json").write_bytes(b"[" * 100_000)
    with pytest.raises(BundleError, match=r"manifest\.json does not parse as JSON: JSON nested too deeply"):
        verify_bundle(bundle, [keys[1]])


def test_a_file_the_reader_may_not_open_is_named(
    bundle: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listed file the service user cannot read (a root-owned 0600 model.onnx) is a refusal naming it. The tests
    run as root, who reads anything, so the refusal of open() is simulated here; the rest of the check is real."""
    import deploy.bundle

    def refused(path: Path) -> tuple[str, int]:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(deploy.bundle, "file_digest", refused)
    with pytest.raises(BundleError, match=r"^cannot read bundle file golden/inputs\.npy: Permission denied$"):
        verify_bundle(bundle, [keys[1]])


def test_untrusted_key_is_named(bundle: Path, other_keys: tuple[Path, Path], keys: tuple[Path, Path]) -> None:
    signer = key_id(load_public_key(keys[1]))
    with pytest.raises(BundleError, match=rf"signed by an untrusted key {signer} \(trusted: "):
        verify_bundle(bundle, [other_keys[1]])
    # one trusted key among several is enough
    assert verify_bundle_details(bundle, [other_keys[1], keys[1]]).key_id == signer


def test_resigned_by_another_key(bundle: Path, keys: tuple[Path, Path], other_keys: tuple[Path, Path]) -> None:
    sign_bundle(bundle, other_keys[0])
    assert verify_bundle_details(bundle, [other_keys[1]]).key_id == key_id(load_public_key(other_keys[1]))
    with pytest.raises(BundleError, match="signed by an untrusted key"):
        verify_bundle(bundle, [keys[1]])


def test_sign_refuses_a_tampered_bundle(bundle: Path, keys: tuple[Path, Path]) -> None:
    (bundle / "model.onnx").write_bytes(b"swapped model")
    before = (bundle / "signature").read_bytes()
    with pytest.raises(BundleError, match=r"file model\.onnx was changed"):
        sign_bundle(bundle, keys[0])
    assert (bundle / "signature").read_bytes() == before


def test_unknown_schema_version(bundle: Path, keys: tuple[Path, Path]) -> None:
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["schema_version"] = SCHEMA_VERSION + 1
    raw["new_field_of_the_future"] = True
    data = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    (bundle / "manifest.json").write_bytes(data)
    signature = sign_manifest(data, load_private_key(keys[0]))  # properly signed, still refused
    (bundle / "signature").write_text(json.dumps(signature))
    with pytest.raises(BundleError, match=rf"manifest schema_version {SCHEMA_VERSION + 1} is not supported"):
        verify_bundle(bundle, [keys[1]])


def test_min_daemon_version_too_high(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    out = tmp_path / "future"
    write_bundle(out, make_manifest(min_daemon_version="9.1.0"), {"model.onnx": b"m"}, keys[0])
    with pytest.raises(BundleError, match=rf"bundle needs daemon version >= 9\.1\.0, this is {__version__}"):
        verify_bundle(out, [keys[1]])
    assert verify_bundle(out, [keys[1]], daemon_version="9.1").min_daemon_version == "9.1.0"
    assert verify_bundle(out, [keys[1]], daemon_version="10.0.0").min_daemon_version == "9.1.0"


@pytest.mark.parametrize("where", ["half", "header_boundary", "end_marker", "one_block_short"])
def test_truncated_tar(bundle: Path, keys: tuple[Path, Path], tmp_path: Path, where: str) -> None:
    tar_path = tmp_path / "b.tar"
    pack_tar(bundle, tar_path)
    data = tar_path.read_bytes()
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
        end = tar.offset  # where the end-of-archive marker starts
    cut = {
        "half": len(data) // 2,
        "header_boundary": members[len(members) // 2].offset,  # whole members missing
        "end_marker": end,  # every member intact, no end-of-archive marker
        "one_block_short": members[-1].offset_data + 512 * ((members[-1].size + 511) // 512) - 512,
    }[where]
    tar_path.write_bytes(data[:cut])
    with pytest.raises(BundleError, match="truncated"):
        verify_bundle(tar_path, [keys[1]])


def test_not_a_tar_and_compressed_tar(bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(BundleError, match=r"junk\.tar is not a tar file or is truncated"):
        verify_bundle(junk, [keys[1]])
    gz = tmp_path / "b.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(bundle, arcname=".")
    with pytest.raises(BundleError, match=r"gzip-compressed: bundles are plain \(uncompressed\) tar files"):
        verify_bundle(gz, [keys[1]])
    with pytest.raises(BundleError, match="no bundle at"):
        verify_bundle(tmp_path / "absent", [keys[1]])


def test_signed_tar_can_be_resigned_in_place(
    bundle: Path, keys: tuple[Path, Path], other_keys: tuple[Path, Path], tmp_path: Path
) -> None:
    tar_path = tmp_path / "b.tar"
    pack_tar(bundle, tar_path)
    sign_bundle(tar_path, other_keys[0])
    assert verify_bundle_details(tar_path, [other_keys[1]]).key_id == key_id(load_public_key(other_keys[1]))


def test_a_tar_is_edited_in_place_only_when_the_edit_succeeds(
    bundle: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """What compile does to a .tar bundle: unpack beside it, add an engine, re-list and re-sign, re-pack."""
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    tar_path = shelf / "b.tar"
    pack_tar(bundle, tar_path)
    before = tar_path.read_bytes()
    with pytest.raises(RuntimeError, match="gate failed"), edit_bundle(tar_path) as root:
        assert root.parent.parent == shelf  # beside the tar, on its file system
        (root / "engines").mkdir()
        (root / "engines" / "k.plan").write_bytes(b"plan")
        refresh_files(root, keys[0])
        raise RuntimeError("gate failed")
    assert tar_path.read_bytes() == before
    assert sorted(p.name for p in shelf.iterdir()) == ["b.tar"]

    with edit_bundle(tar_path) as root:
        (root / "engines").mkdir()
        (root / "engines" / "k.plan").write_bytes(b"plan")
        refresh_files(root, keys[0])
    assert sorted(p.name for p in shelf.iterdir()) == ["b.tar"]
    manifest = verify_bundle(tar_path, [keys[1]])
    assert manifest.files["engines/k.plan"].size == 4
    with edit_bundle(bundle) as root:
        assert root == bundle
    with pytest.raises(BundleError, match="no bundle at"), edit_bundle(tmp_path / "absent"):
        pass
    # an edit killed mid-way (SIGKILL, power cut) leaves its folder beside the tar: the next edit removes it
    import subprocess
    import sys

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    (shelf / f"edge-bundle-{dead}-k2j4" / "bundle").mkdir(parents=True)
    with edit_bundle(tar_path):
        pass
    assert sorted(p.name for p in shelf.iterdir()) == ["b.tar"]


# ------------------------------------------------------------------------------------- writing


def test_write_bundle_refusals(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(BundleError, match="exists and is not an empty folder"):
        write_bundle(busy, make_manifest(), {"model.onnx": b"m"}, keys[0])
    for bad, why in [("../x", "'..' in the path"), ("/etc/x", "absolute path"), ("a//b", "not a normalised")]:
        with pytest.raises(BundleError, match=why):
            write_bundle(tmp_path / "b1", make_manifest(), {bad: b"m"}, keys[0])
    with pytest.raises(BundleError, match="written by write_bundle itself"):
        write_bundle(tmp_path / "b1", make_manifest(), {"signature": b"m"}, keys[0])
    # a failure half-way leaves nothing behind (atomic build in a temp folder)
    with pytest.raises(BundleError, match=r"cannot add golden/maps\.npy to the bundle"):
        write_bundle(
            tmp_path / "b1", make_manifest(), {"model.onnx": b"m", "golden/maps.npy": tmp_path / "nope"}, keys[0]
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "keys"]
    # an empty existing folder is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    write_bundle(empty, make_manifest(), {"model.onnx": b"m"}, keys[0])
    assert verify_bundle(empty, [keys[1]]).files["model.onnx"].size == 1


def test_write_bundle_refuses_a_nan_calibration(tmp_path: Path) -> None:
    calibration = make_manifest().calibration.model_copy(update={"threshold": float("nan")})
    with pytest.raises(BundleError, match=r"refusing to write this manifest: .*calibration\.threshold: .*finite"):
        write_bundle(tmp_path / "nan", make_manifest(calibration=calibration), {"model.onnx": b"m"}, None)
    assert not (tmp_path / "nan").exists()


def test_refresh_files_after_adding_an_engine(bundle: Path, keys: tuple[Path, Path]) -> None:
    engines = bundle / "engines"
    engines.mkdir()
    (engines / "abc-trt10.3-sm87-fp16-b8.plan").write_bytes(b"plan bytes")
    (engines / "abc-trt10.3-sm87-fp16-b8.json").write_text("{}")
    manifest = refresh_files(bundle, keys[0])
    assert "engines/abc-trt10.3-sm87-fp16-b8.plan" in manifest.files
    assert verify_bundle(bundle, [keys[1]]) == manifest
    # without a key the stale signature goes: consistent but unsigned
    (engines / "abc-trt10.3-sm87-fp16-b8.plan").unlink()
    (engines / "abc-trt10.3-sm87-fp16-b8.json").unlink()
    manifest = refresh_files(bundle, None)
    assert not any(n.startswith("engines/") for n in manifest.files)
    with pytest.raises(BundleError, match="bundle is unsigned"):
        verify_bundle(bundle, [keys[1]])
    assert verify_bundle(bundle, [], require_signature=False) == manifest
    # it never launders a changed file outside engines/
    (bundle / "model.onnx").write_bytes(b"swapped")
    with pytest.raises(BundleError, match=r"file model\.onnx was changed"):
        refresh_files(bundle, keys[0])


def test_an_engine_installed_twice_under_one_key_keeps_the_bundle_signed_and_consistent(
    bundle: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """compile's last step (the TensorRT build and gate before it need a GPU): a gated engine staged beside the
    bundle replaces one of the same key that the signed manifest lists, and the bundle verifies after each."""
    from deploy.engines import install_engine

    name = "abc-trt10.3-sm87-fp16-b8"
    for build in (b"first build", b"second build: TensorRT builds differ"):
        staging = tmp_path / "staging"
        staging.mkdir()
        (staging / f"{name}.plan").write_bytes(build)
        (staging / f"{name}.json").write_text("{}")
        plan = install_engine(bundle, verify_bundle(bundle, [keys[1]]), staging / f"{name}.plan", keys[0])
        assert plan == bundle / "engines" / f"{name}.plan" and plan.read_bytes() == build
        assert not any(staging.iterdir())
        staging.rmdir()
        manifest = verify_bundle(bundle, [keys[1]])
        assert {f"engines/{name}.plan", f"engines/{name}.json"} <= set(manifest.files)


# ------------------------------------------------------------------------------- malicious tars


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_special(tar: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    tar.addfile(info)


@pytest.fixture
def target(tmp_path: Path) -> Path:
    """tmp/parent/target: the extraction target; parent must stay empty after a refusal."""
    (tmp_path / "parent").mkdir()
    return tmp_path / "parent" / "target"


def _assert_nothing_written(tmp_path: Path, target: Path) -> None:
    assert list(target.parent.iterdir()) == [] or (target.is_dir() and list(target.iterdir()) == [])
    assert [p for p in target.parent.iterdir() if p != target] == []
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "parent" / "evil.txt").exists()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda t, tmp: _add_file(t, "../evil.txt", b"pwned"), r"tar member '\.\./evil\.txt' refused: '\.\.'"),
        (lambda t, tmp: _add_file(t, "golden/../../evil.txt", b"pwned"), r"'\.\.' in the path"),
        (lambda t, tmp: _add_file(t, str(tmp / "evil.txt"), b"pwned"), "refused: absolute path"),
        (lambda t, tmp: _add_special(t, "model.onnx", tarfile.SYMTYPE, "/etc/passwd"), "it is a symlink"),
        (lambda t, tmp: _add_special(t, "golden", tarfile.SYMTYPE, ".."), "it is a symlink"),
        (lambda t, tmp: _add_special(t, "model.onnx", tarfile.LNKTYPE, "/etc/passwd"), "it is a hardlink"),
        (lambda t, tmp: _add_special(t, "dev", tarfile.CHRTYPE), "it is a device"),
        (lambda t, tmp: _add_special(t, "disk", tarfile.BLKTYPE), "it is a device"),
        (lambda t, tmp: _add_special(t, "pipe", tarfile.FIFOTYPE), "it is a fifo"),
        (lambda t, tmp: _add_file(t, "model.onnx", b"again"), "the name appears twice"),
        (lambda t, tmp: _add_file(t, "manifest.json/evil.txt", b"x"), "its folder manifest.json is a file"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "symlink",
        "symlink-dir",
        "hardlink",
        "chr",
        "blk",
        "fifo",
        "dup",
        "file-as-folder",
    ],
)
def test_malicious_tar_refused_without_writing(tmp_path: Path, target: Path, build, message: str) -> None:  # type: ignore[no-untyped-def]
    tar_path = tmp_path / "evil.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_file(tar, "manifest.json", b"{}")  # harmless members first: they must not be written either
        _add_file(tar, "model.onnx", b"model")
        build(tar, tmp_path)
        _add_file(tar, "zzz-after.txt", b"after")
    with pytest.raises(BundleError, match=message):
        safe_extract(tar_path, target)
    _assert_nothing_written(tmp_path, target)
    with pytest.raises(BundleError, match=message):  # verify refuses it the same way
        verify_bundle(tar_path, [])


def test_size_bombs_refused_without_writing(tmp_path: Path, target: Path) -> None:
    one_big = tmp_path / "big.tar"
    with tarfile.open(one_big, "w") as tar:
        _add_file(tar, "model.onnx", b"\0" * 2000)
    with pytest.raises(BundleError, match=r"tar member model\.onnx refused: 2000 bytes, over the limit of 1000"):
        safe_extract(one_big, target, max_bytes=1000)
    _assert_nothing_written(tmp_path, target)

    many_small = tmp_path / "total.tar"
    with tarfile.open(many_small, "w") as tar:
        for i in range(3):
            _add_file(tar, f"part{i}", b"\0" * 400)
    with pytest.raises(BundleError, match=r"tar member part2 refused: the unpacked total exceeds 1000 bytes"):
        safe_extract(many_small, target, max_bytes=1000)
    _assert_nothing_written(tmp_path, target)

    huge = tmp_path / "huge.tar"
    with tarfile.open(huge, "w") as tar:
        _add_file(tar, "model.onnx", b"\0" * 20000)
    with pytest.raises(BundleError, match=r"huge\.tar is \d+ bytes, over the limit of 100$"):  # refused unread
        safe_extract(huge, target, max_bytes=100, max_members=0)
    _assert_nothing_written(tmp_path, target)

    with pytest.raises(BundleError, match="has more than 2 members"):
        safe_extract(many_small, target, max_members=2)
    _assert_nothing_written(tmp_path, target)

    # a header that claims 10 GiB (the data is not even there): refused by the default limit, before reading
    forged = tmp_path / "forged.tar"
    info = tarfile.TarInfo("model.onnx")
    info.size = 10 * 1024**3
    forged.write_bytes(info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 4096)
    with pytest.raises(BundleError, match=r"model\.onnx refused: 10737418240 bytes, over the limit of 2147483648"):
        safe_extract(forged, target)
    _assert_nothing_written(tmp_path, target)


def _pax_record(key: str, value: object) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def _raw_member(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> bytes:
    """One member as raw ustar bytes: header, data, padding (tarfile's writer will not forge what these tests need)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def _pax_header(*records: bytes) -> bytes:
    return _raw_member("././@PaxHeader", b"".join(records), tarfile.XHDTYPE)


def _long_name_header(size: int) -> bytes:
    """A GNU long-name header announcing ``size`` bytes of name (the bytes themselves are not needed to refuse it)."""
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


END_OF_ARCHIVE = b"\0" * (2 * tarfile.BLOCKSIZE)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # PAX sparse members are typed REGTYPE: each would copy realsize bytes of whatever follows it in the tar
        (
            _pax_header(
                _pax_record("GNU.sparse.major", 1),
                _pax_record("GNU.sparse.minor", 0),
                _pax_record("GNU.sparse.realsize", 1 << 20),
            )
            + _raw_member("model.onnx", b"0\n".ljust(tarfile.BLOCKSIZE, b"\0")),
            "it is a sparse file",
        ),
        (_pax_header(_pax_record("size", -5)) + _raw_member("model.onnx", b""), "negative size -5"),
        # tarfile reads a long-name header whole into memory: 200 MB here, refused before the read
        (_long_name_header(200 * 1024**2), "a tar header asks to read 209715200 bytes"),
        # chained extended headers recurse in tarfile (RecursionError)
        (b"".join(_pax_header(_pax_record("comment", "x")) for _ in range(2000)), "truncated or corrupt"),
    ],
    ids=["pax-sparse", "negative-size", "huge-longname", "pax-chain"],
)
def test_forged_headers_are_refused_as_bundle_errors(tmp_path: Path, target: Path, body: bytes, message: str) -> None:
    """Headers no tar writer makes but an attacker can: each is a one-line BundleError (an update refused, exit 2 in
    the CLIs), never another exception, and nothing is written."""
    tar_path = tmp_path / "forged.tar"
    tar_path.write_bytes(_raw_member("manifest.json", b"{}") + body + _raw_member("after", b"x") + END_OF_ARCHIVE)
    with pytest.raises(BundleError, match=message):
        safe_extract(tar_path, target)
    _assert_nothing_written(tmp_path, target)
    # manifest_sha256 (which names a bundle before anything is verified) meets the header before the manifest
    tar_path.write_bytes(body + _raw_member("manifest.json", b"{}") + END_OF_ARCHIVE)
    with contextlib.suppress(BundleError):
        manifest_sha256(tar_path)


def test_safe_extract_target_must_be_empty(tmp_path: Path, bundle: Path) -> None:
    tar_path = tmp_path / "b.tar"
    pack_tar(bundle, tar_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="exists and is not an empty folder"):
        safe_extract(tar_path, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    safe_extract(tar_path, empty)
    assert (empty / "golden" / "maps.npy").read_bytes() == (bundle / "golden" / "maps.npy").read_bytes()
    assert oct((empty / "model.onnx").stat().st_mode & 0o777) != oct(0o777)


# ------------------------------------------------------------------------------------ manifest


def test_calibration_normalise() -> None:
    cal = make_manifest().calibration  # threshold 0.3, raw 0.1..0.5
    assert cal.normalise(0.3) == pytest.approx(0.5)
    assert cal.normalise(0.4) == pytest.approx(0.75)
    assert cal.normalise(10.0) == 1.0 and cal.normalise(-10.0) == 0.0
    out = cal.normalise(np.array([0.3, 0.2, 5.0], dtype=np.float32))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, [0.5, 0.25, 1.0], atol=1e-6)
    flat = cal.model_copy(update={"raw_min": 0.3, "raw_max": 0.3})
    assert flat.normalise(0.3) == 0.5 and flat.normalise(0.31) == 1.0 and flat.normalise(0.29) == 0.0


def test_manifest_schema() -> None:
    m = make_manifest()
    assert m.schema_version == SCHEMA_VERSION and m.min_daemon_version == "0.1.0"
    assert m.input.to_input_spec() == InputSpec(height=H, width=W, channels=1, colour_order="RGB")
    assert parse_manifest(canonical_bytes(m)) == m
    raw = json.loads(canonical_bytes(m))
    raw["surprise"] = 1
    with pytest.raises(BundleError, match=r"manifest\.json is invalid at surprise: Extra inputs are not permitted"):
        parse_manifest(json.dumps(raw).encode())
    raw = json.loads(canonical_bytes(m))
    raw["input"]["channels"] = 4
    with pytest.raises(BundleError, match=r"invalid at input\.channels"):
        parse_manifest(json.dumps(raw).encode())
    raw = json.loads(canonical_bytes(m))
    del raw["schema_version"]
    with pytest.raises(BundleError, match="no integer schema_version"):
        parse_manifest(json.dumps(raw).encode())


def test_version_tuple() -> None:
    assert version_tuple("0.1.0") == version_tuple("0.1") == (0, 1)
    assert version_tuple("0.10.0") > version_tuple("0.9.9")
    assert version_tuple("1.2.0rc1") == (1, 2)
    with pytest.raises(BundleError, match="not a version number"):
        version_tuple("latest")
