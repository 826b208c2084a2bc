"""Export: one verified bundle; damage of any kind is refused in one line; kills are safe."""

import json
import shutil
import signal
import struct
import subprocess
import sys
import time

import onnx
import pytest

from rissole_edge.bundle import HEADER, Bundle, BundleError, data_start

from conftest import SAMPLE, cli


def _one_line_exit_2(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_export_then_verify_and_info(tiny_bundle):
    assert cli("verify", str(tiny_bundle), check=True).stdout.strip().endswith("OK")
    manifest = json.loads(cli("info", str(tiny_bundle), "--json", check=True).stdout)
    assert manifest["quantization"]["mode"] == "int8" and manifest["quantization"]["op_types"] == ["Conv"]
    parity = manifest["parity"]
    assert parity["denoiser_fp32_max_abs_error"] < 1e-3 and parity["decoder_fp32_max_abs_error"] < 1e-3
    assert parity["parity_images"] >= 16 and "int8_vs_fp32_psnr_mean" in parity and parity["int8_speedup"] > 0
    assert manifest["dataset"]["labels"][:2] == ["ankle-boot", "bag"]
    for name, entry in manifest["members"].items():
        assert len(entry["sha256"]) == 64, name
    text = cli("info", str(tiny_bundle), check=True).stdout
    assert "denoiser.onnx" in text and "int8" in text


def test_onnx_members_pass_the_full_checker(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    for name in ("denoiser.onnx", "decoder.onnx", "encoder.onnx"):
        onnx.checker.check_model(onnx.load_from_string(bundle.read(name)), full_check=True)
    ops = {n.op_type for n in onnx.load_from_string(bundle.read("denoiser.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_fp32_export(tiny_run, tmp_path):
    out = tmp_path / "fp32.rissole"
    cli("export", str(tiny_run), "-o", str(out), "--quantize", "fp32", "--db-limit", "100", check=True)
    manifest = Bundle.open(out).manifest
    assert manifest["quantization"]["mode"] == "fp32" and manifest["retrieval"]["images"] == 100
    assert manifest["retrieval"]["recall"] >= 0.95
    assert cli("verify", str(out)).returncode == 0


def test_arm64_preset(tiny_run, tmp_path):
    out = tmp_path / "arm.rissole"
    cli("export", str(tiny_run), "-o", str(out), "--target", "arm64", "--calibration-samples", "4", check=True)
    q = Bundle.open(out).manifest["quantization"]
    assert (q["target"], q["activations"], q["weights"]) == ("arm64", "QInt8", "QInt8")
    assert cli("verify", str(out)).returncode == 0


def test_every_damaged_member_is_refused(tiny_bundle, tmp_path):
    bundle = Bundle.open(tiny_bundle)
    start = data_start(struct.unpack_from("<I", tiny_bundle.read_bytes(), 12)[0])
    for name, member in bundle.members.items():
        damaged = tmp_path / f"{name}.rissole"
        raw = bytearray(tiny_bundle.read_bytes())
        raw[start + member.offset + member.size // 2] ^= 0x01
        damaged.write_bytes(bytes(raw))
        line = _one_line_exit_2(cli("verify", str(damaged)))
        assert name in line and "checksum" in line


def test_truncated_and_edited_bundles_are_refused(tiny_bundle, tmp_path):
    raw = tiny_bundle.read_bytes()
    for cut in (10, 100, len(raw) // 2, len(raw) - 1):
        (tmp_path / "cut.rissole").write_bytes(raw[:cut])
        _one_line_exit_2(cli("verify", str(tmp_path / "cut.rissole")))
    edited = raw[:HEADER.size] + raw[HEADER.size:].replace(b'"name": "tiny"', b'"name": "tinx"', 1)  # same length
    (tmp_path / "edited.rissole").write_bytes(edited)
    assert "manifest" in _one_line_exit_2(cli("verify", str(tmp_path / "edited.rissole")))
    newer = bytearray(raw)
    newer[8:12] = struct.pack("<I", 99)
    (tmp_path / "newer.rissole").write_bytes(bytes(newer))
    assert "upgrade rissole-edge" in _one_line_exit_2(cli("verify", str(tmp_path / "newer.rissole")))
    _one_line_exit_2(cli("verify", str(tmp_path / "missing.rissole")))


def test_unsafe_member_tables_are_refused():
    from export_helpers import bundle_with_members
    for members in ({"../evil": {"offset": 0, "size": 0, "sha256": "0" * 64}},
                    {"/abs": {"offset": 0, "size": 0, "sha256": "0" * 64}},
                    {"a.npy": {"offset": -64, "size": 10, "sha256": "0" * 64}},
                    {"a.npy": {"offset": 0, "size": "10", "sha256": "0" * 64}}):
        with pytest.raises(BundleError):
            Bundle.open(bundle_with_members(members))


def test_a_killed_export_leaves_no_bundle_and_the_old_one_intact(tiny_run, tiny_bundle, tmp_path):
    target = tmp_path / "model.rissole"
    shutil.copy(tiny_bundle, target)
    before = target.read_bytes()
    for delay in (0.5, 2.5, 4.5):
        proc = subprocess.Popen([sys.executable, "-m", "rissole_edge", "export", str(tiny_run), "-o", str(target),
                                 "--calibration-samples", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert target.read_bytes() == before or Bundle.open(target).manifest   # old, or a complete new one
        before = target.read_bytes()
        for path in tmp_path.iterdir():
            if path != target:
                with pytest.raises(BundleError):
                    Bundle.open(path)
    assert cli("verify", str(target)).returncode == 0


def test_build_db_output_generates(tiny_bundle, tmp_path):
    out = tmp_path / "rebuilt.rissole"
    cli("build-db", str(tiny_bundle), str(SAMPLE), "-o", str(out), check=True)
    manifest = Bundle.open(out).manifest
    assert manifest["retrieval"]["images"] == 300 and manifest["dataset"]["name"] == "fashion-sample"
    proc = cli("generate", "-m", str(out), "-n", "2", "--label", "bag", "-o", str(tmp_path / "png"), "--json", check=True)
    assert len(json.loads(proc.stdout)["images"]) == 2


def test_export_bad_input(tmp_path, tiny_run):
    _one_line_exit_2(cli("export", str(tmp_path), "-o", str(tmp_path / "x.rissole")))
    _one_line_exit_2(cli("export", str(tiny_run), "-o", str(tmp_path / "no" / "x.rissole")))
    _one_line_exit_2(cli("export", str(tiny_run), "-o", str(tmp_path / "x.rissole"), "--quantize", "int4"))
    assert not list(tmp_path.glob("*.rissole"))
