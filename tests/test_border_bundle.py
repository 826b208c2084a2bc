"""Border-conditioned bundles (manifest `denoiser.border`): the manifest field, the runtime's
whole-image chunks and window gather against the torch sampler, and the memory planner's count.

The fast tests put a small random-weight border denoiser (fp32) into the shipped fashion-mnist
bundle in memory: its database, decoder and geometry, a new denoiser, no training."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLE, cli
from export_helpers import check_alone_batched_and_threaded, check_one_image_budget, check_runtime_matches_torch
from rissole_edge import budget, shipped
from rissole_edge.bundle import Bundle, BundleError, Spec
from rissole_edge.generator import Generator, Query
from rissole_export import (checkpoint, config, denoiser, distill, exporter, graph, onnx_export, pack, sampling,
                             teacher)
from rissole_export.sampling import RunModels

BASE = "fashion-mnist"


@pytest.fixture(scope="module")
def base() -> tuple[dict, dict[str, bytes]]:
    return pack.contents(Bundle.open(shipped.resolve(BASE)))


def _net(spec: Spec, border: int) -> denoiser.UNet:
    torch.manual_seed(0)
    cfg = config.resolve("tiny", {"denoiser": {"border": border}}).denoiser
    net = denoiser.build(cfg, spec.latent_channels, spec.latent_side)
    for p in net.parameters():          # the output and window convs start at zero: wake them
        torch.nn.init.normal_(p, std=0.05)
    return net.eval()


def _bundle(base: tuple[dict, dict[str, bytes]], net: denoiser.UNet | None, border: int) -> Bundle:
    manifest, members = copy.deepcopy(base[0]), dict(base[1])
    manifest["denoiser"]["border"] = border
    if net is not None:
        members["denoiser.onnx"] = onnx_export.denoiser(net)
    return Bundle.in_memory(manifest, members)


@pytest.fixture(scope="module")
def bordered(base) -> tuple[Bundle, denoiser.UNet]:
    spec = Spec.from_manifest(base[0])
    net = _net(spec, 1)
    return _bundle(base, net, 1), net


@pytest.mark.parametrize("value", [-1, 5, 1.5, "2", True])
def test_a_bad_denoiser_border_is_refused_in_one_line(base, value):
    manifest = copy.deepcopy(base[0])
    manifest["denoiser"]["border"] = value           # fashion's blocks are 4 latent pixels wide
    with pytest.raises(BundleError, match="denoiser.border") as e:
        Spec.from_manifest(manifest)
    assert "\n" not in str(e.value)


def test_old_bundles_read_border_0_and_a_valid_border_is_kept(base):
    manifest = copy.deepcopy(base[0])
    manifest["denoiser"].pop("border", None)
    assert Spec.from_manifest(manifest).border == 0
    manifest["denoiser"]["border"] = 4
    spec = Spec.from_manifest(manifest)
    assert (spec.border, spec.window_side, spec.blocks_together) == (4, 12, 4)


def test_a_manifest_that_disagrees_with_the_denoiser_s_inputs_is_refused(base, bordered):
    with pytest.raises(BundleError, match="takes no window input.*denoiser.border = 1"):
        Generator.open(_bundle(base, None, 1))          # the shipped, plain denoiser
    manifest, members = copy.deepcopy(base[0]), dict(base[1])
    manifest["denoiser"]["border"] = 0
    members["denoiser.onnx"] = bordered[0].read("denoiser.onnx")
    with pytest.raises(BundleError, match="takes window input.*denoiser.border = 0"):
        Generator.open(Bundle.in_memory(manifest, members))
    manifest["denoiser"]["border"] = 2                  # the window is 8 wide, the manifest says 4 + 2*2
    with pytest.raises(BundleError, match="window"):
        Generator.open(Bundle.in_memory(manifest, members))


def test_the_runtime_samples_what_the_torch_sampler_does(bordered):
    """Same network (fp32), noise and neighbours: the runtime's whole-image chunks and numpy
    window gather give the torch sampler's images (its windows: denoiser.windows)."""
    check_runtime_matches_torch(*bordered)


def test_an_image_is_the_same_alone_in_a_batch_and_on_two_threads(bordered):
    check_alone_batched_and_threaded(bordered[0], guidance=1.0)


def test_the_planner_keeps_whole_images_in_flight(base, bordered):
    plain = Spec.from_manifest(base[0])
    spec = Spec.from_manifest(bordered[0].manifest)
    p = spec.positions
    window_bytes = 4 * spec.latent_channels * spec.window_side ** 2
    assert spec.row_bytes == spec.block_bytes + 2 * window_bytes and plain.row_bytes == plain.block_bytes
    assert budget.minimum(spec, 0, 2) - budget.minimum(plain, 0, 2) == 2 * (p * spec.row_bytes - plain.row_bytes)
    least = budget.minimum(spec, 10 << 20, 2)
    plan = budget.make_plan(least, spec, 10 << 20, 2)
    assert plan.blocks_per_call == p
    with pytest.raises(Exception, match="at least"):
        budget.make_plan(least - 1, spec, 10 << 20, 2)
    for rows in (None, least + 5 * spec.block_bytes):
        assert budget.make_plan(rows, spec, 10 << 20, 2).blocks_per_call % p == 0


def test_the_exporter_s_row_count_includes_the_window(base):
    spec = Spec.from_manifest(base[0])
    bordered, plain = _net(spec, 1), _net(spec, 0)
    extra = graph.activation_bytes(onnx_export.denoiser(bordered)) - graph.activation_bytes(onnx_export.denoiser(plain))
    window_bytes = 4 * spec.latent_channels * (spec.block_side + 2) ** 2
    assert extra >= window_bytes            # the input itself, and the window conv's output and sum


def test_a_memory_budget_of_one_image_generates_what_an_unbounded_run_does(bordered, monkeypatch):
    check_one_image_budget(bordered[0], monkeypatch)


def test_a_border_fine_tune_of_a_bundle_exports_over_it(base, tmp_path):
    """A run holding config.json, denoiser.safetensors and its base bundle as teacher.rissole
    (benchmarks/ablations/seams.py's rows) exports as that bundle with the new denoiser."""
    spec = Spec.from_manifest(base[0])
    cfg = config.resolve("tiny", {"denoiser": {"border": 1}})
    net = _net(spec, 1)
    config.save(cfg, tmp_path / "config.json")
    checkpoint.save(tmp_path / "denoiser.safetensors", 1, {"model": net, "ema": copy.deepcopy(net)}, {})
    (tmp_path / distill.TEACHER_BUNDLE).write_bytes(shipped.resolve(BASE).read_bytes())
    out = tmp_path / "tuned.rissole"
    manifest = exporter.export(tmp_path, out, mode="fp32", calibration_samples=2, log=lambda *a: None)
    assert manifest["denoiser"]["border"] == 1 and "distilled" not in manifest
    assert manifest["sampling"] == base[0]["sampling"]          # the base bundle's recommendation
    with Generator.open(out, threads=1) as gen:
        assert gen.spec.border == 1 and gen.generate(2, seed=1, steps=2, as_array=True).shape[0] == 2


# ---------------------------------------------------------------- trained: train -> export -> runtime -> distill

@pytest.fixture(scope="module")
def border_config(tiny_config, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("border") / "border.toml"
    path.write_text(tiny_config.read_text().replace("[denoiser]", "[denoiser]\nborder = 1"))
    return path


@pytest.fixture(scope="module")
def border_run(tiny_run, border_config, tmp_path_factory) -> Path:
    """The tiny run's autoencoder and database with a border-conditioned denoiser (w = 1)."""
    out = tmp_path_factory.mktemp("border") / "run"
    cli("train", str(SAMPLE), "--out", str(out), "--preset", "tiny", "--config", str(border_config),
        "--reuse", str(tiny_run), check=True)
    return out


def _runtime_images(bundle: Path, entries: list[int], seed: int) -> np.ndarray:
    with Generator.open(bundle, threads=1) as gen:
        return np.concatenate([gen.generate(1, seed=seed, first_index=i, steps=10, sampler_name="ddim", guidance=2.0,
                                            query=Query(entry=q), as_array=True) for i, q in enumerate(entries)])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return 99.0 if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def test_an_exported_border_run_samples_what_torch_does_in_fp32_and_int8(border_run, tiny_run, tiny_bundle, tmp_path):
    """fp32: the torch sampler's images; int8: as near them as the plain tiny run's int8 bundle is
    to its own torch images (the tiny model is barely trained, so int8 costs it more than a real one)."""
    entries, seed = [0, 5, 9, 2, 7, 1], 3
    m = RunModels.load(border_run)
    want = sampling.generate(m, entries, seed, steps=10, sampler="ddim", guidance=2.0)
    for mode in ("fp32", "int8"):
        out = tmp_path / f"{mode}.rissole"
        cli("export", str(border_run), "-o", str(out), "--quantize", mode, "--calibration-samples", "8", check=True)
        assert Bundle.open(out).manifest["denoiser"]["border"] == 1
        got = _runtime_images(out, entries, seed)
        if mode == "fp32":
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    plain = _psnr(_runtime_images(tiny_bundle, entries, seed),
                  sampling.generate(RunModels.load(tiny_run), entries, seed, steps=10, sampler="ddim", guidance=2.0))
    assert _psnr(got, want) > plain - 3, (_psnr(got, want), plain)
    assert "border 1" in cli("info", str(out), check=True).stdout
    cli("verify", str(out), check=True)
    # the teacher rebuilt from the bundle carries the window conv (kept fp32: exact)
    rebuilt = teacher.from_bundle(out, config.load(border_run / "config.json"))
    assert torch.equal(rebuilt.net.state_dict()["border_in.weight"], m.net.state_dict()["border_in.weight"])


def test_a_border_teacher_distils_into_a_border_student_that_exports(border_run, tmp_path):
    student = tmp_path / "student"
    distill.distill(border_run, 2, student, progress=False, train_steps=4, batch_size=8, checkpoint_every=2,
                    teacher_steps=6)
    assert RunModels.load(student).net.border == 1
    out = tmp_path / "student.rissole"
    cli("export", str(student), "-o", str(out), "--calibration-samples", "4", check=True)
    assert Bundle.open(out).manifest["denoiser"]["border"] == 1
    png = tmp_path / "png"
    cli("generate", "-m", str(out), "-n", "3", "-o", str(png), check=True)
    assert len(list(png.glob("*.png"))) == 3
