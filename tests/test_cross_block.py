"""Attention across the blocks of an image (denoiser.cross_block): the blocks of one image
compute together at the bottleneck, so a block's prediction depends on its image's other
blocks; images stay independent of each other, in training batches and in sampling. Bundles
carry it (manifest denoiser.cross_block): the runtime calls the graph on whole images.

The bundle tests put a small random-weight cross-block denoiser into the shipped fashion-mnist
bundle in memory (its database, decoder and geometry; no training), as test_border_bundle does."""

import copy

import numpy as np
import onnx
import pytest
import torch

from rissole_edge import shipped
from rissole_edge.bundle import ROWS_PER_ITEM, Bundle, BundleError, Spec
from rissole_edge.generator import Generator
from rissole_export import checkpoint, config, denoiser, distill, exporter, graph, onnx_export, pack, train
from rissole_export.diffusion import Diffusion
from rissole_export.sampling import generate_latents

from conftest import cli, train_variant
from export_helpers import check_alone_batched_and_threaded, check_one_image_budget, check_runtime_matches_torch

B, C, S = 2, 4, 4                 # 2x2 blocks of 4x4 latent pixels, 4 channels
P = B * B


def _net(cross: bool = True, wake: bool = True) -> denoiser.UNet:
    torch.manual_seed(0)
    cfg = config.resolve("tiny", {"denoiser": {"cross_block": cross, "batch_size": 8}}).denoiser
    net = denoiser.build(cfg, C, B * S)
    if wake:                        # the output conv and the mixer's projection start at zero
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return net.eval()


def _inputs(images: int, k: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(images * P, C, S, S, generator=g)
    t = torch.tensor([300.0] * P + [800.0] * P)[: images * P]
    pos = torch.arange(P).repeat(images)
    return x, t, pos, torch.randn(images * P, k * C, S, S, generator=g)


def test_a_fresh_mixer_is_the_identity():
    plain, mixed = _net(cross=False), _net(wake=False)
    missing, unexpected = mixed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(name.startswith("mixer.") for name in missing)
    x, t, pos, cond = _inputs(2, plain.k)
    assert torch.allclose(plain(x, t, pos, cond), mixed(x, t, pos, cond), atol=1e-6)


@pytest.mark.parametrize("grad", [True, False])
def test_the_written_out_attention_is_nn_multihead_attention(grad):
    """The mixer keeps nn.MultiheadAttention's weights (and checkpoint names) but computes with
    them itself: under no_grad the module takes a fused kernel the ONNX exporter cannot export."""
    mixer = _net().mixer
    tokens = torch.randn(3, mixer.where.shape[0], mixer.where.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.set_grad_enabled(grad):
        want, _ = mixer.attn(tokens, tokens, tokens, need_weights=False)
        assert torch.allclose(mixer._attend(tokens), want, atol=1e-5)


@pytest.mark.parametrize("cross", [True, False])
def test_a_block_sees_its_own_image_s_other_blocks_and_no_other_image(cross):
    net = _net(cross)
    x, t, pos, cond = _inputs(2, net.k)
    before = net(x, t, pos, cond)
    x2 = x.clone()
    x2[1] += 1.0                    # image 0, block 1
    after = net(x2, t, pos, cond)
    assert torch.equal(after[P:], before[P:])                       # image 1 never sees image 0
    assert torch.equal(after[2:P], before[2:P]) != cross            # image 0's blocks 2, 3 do, with the mixer


def test_sampling_gives_an_image_alone_or_in_a_batch_alike():
    net = _net()
    latents = torch.randn(6, P, C, S, S, generator=torch.Generator().manual_seed(1))
    neighbours = np.array([[j for j in range(6) if j != i] for i in range(6)])

    def sample(ids: list[int]) -> np.ndarray:
        return generate_latents(net, latents, neighbours, Diffusion(), ids, seed=7, steps=3, guidance=2.0)
    np.testing.assert_allclose(sample([2]), sample([2, 5, 1])[:1], atol=1e-5)


def test_cross_block_is_refused_where_a_batch_cannot_hold_whole_images():
    for bad in ({"batch_size": 6}, {"kind": "whole"}, {"blocks_per_side": 1}):
        with pytest.raises(config.ConfigError, match="cross_block"):
            config.resolve("tiny", {"denoiser": {"cross_block": True, "batch_size": 8, **bad}})


@pytest.mark.parametrize("switches,group", [({"cross_block": True}, P), ({"cross_block": True, "seam_loss": 0.25}, P),
                                            ({"seam_loss": 0.25}, 2), ({}, 1)])
def test_the_rows_of_one_image_share_its_neighbours_and_dropout_as_at_sampling(switches, group):
    """A training batch holds whole images (cross_block) or adjacent pairs (seam loss); their rows
    must be conditioned on one draw of k neighbours, kept or dropped together."""
    cfg = config.resolve("tiny", {"denoiser": {"batch_size": 48, "cond_drop": 0.5, **switches}}).denoiser
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(30, P, C, S, S, generator=g)
    neighbours = torch.stack([torch.randperm(30, generator=g)[:8] for _ in range(30)])
    pairs, _ = train.adjacent_pairs(B)
    idx, pos, got, pick, nb, cond, keep = train.draw_batch(cfg, 2, latents, neighbours, pairs, 48, g)
    assert got == group and len(idx) == 48
    rows = lambda v: v.reshape(48 // group, group, *v.shape[1:])    # noqa: E731  (one image per row)
    for v in (idx, nb, keep):
        assert torch.equal(rows(v), rows(v)[:, :1].expand_as(rows(v)))
    if group == P:
        assert torch.equal(rows(pos), torch.arange(P).expand(48 // P, P))
    assert 0 < keep.mean() < 1 and len(set(keep[::group].tolist())) == 2        # some images kept, some dropped
    assert all(set(nb[r].tolist()) <= set(neighbours[idx[r]].tolist()) for r in range(48))
    expected = latents[nb, pos[:, None]].reshape(48, -1, S, S) * keep[:, None, None, None]
    assert torch.equal(cond, expected)
    if group == 1:      # independent rows: not every image's rows agree by chance
        assert len({tuple(r.tolist()) for r in nb}) > 1


# ---------------------------------------------------------------- bundles

@pytest.fixture(scope="module")
def base() -> tuple[dict, dict[str, bytes]]:
    return pack.contents(Bundle.open(shipped.resolve("fashion-mnist")))


def _bundle_net(spec: Spec, cross: bool = True) -> denoiser.UNet:
    torch.manual_seed(0)
    cfg = config.resolve("tiny", {"denoiser": {"cross_block": cross, "batch_size": 8}}).denoiser
    net = denoiser.build(cfg, spec.latent_channels, spec.latent_side)
    for p in net.parameters():          # the output conv and the mixer's projection start at zero
        torch.nn.init.normal_(p, std=0.05)
    return net.eval()


def _with_denoiser(base: tuple[dict, dict[str, bytes]], model: bytes, cross: bool) -> Bundle:
    manifest, members = copy.deepcopy(base[0]), dict(base[1])
    manifest["denoiser"]["cross_block"] = cross
    return Bundle.in_memory(manifest, {**members, "denoiser.onnx": model})


@pytest.fixture(scope="module")
def crossed(base) -> tuple[Bundle, denoiser.UNet]:
    net = _bundle_net(Spec.from_manifest(base[0]))
    return _with_denoiser(base, onnx_export.denoiser(net), True), net


def test_the_exported_graph_takes_whole_images_and_counts_the_mixer_per_block(base):
    """The graph says how many rows make an item (P); graph.py's per-block counts give the mixer's
    attention its share: 4Tc^2 (projections) + 2T^2c (scores, mix) per image of T tokens."""
    spec = Spec.from_manifest(base[0])
    cross, plain = _bundle_net(spec), _bundle_net(spec, cross=False)
    model = onnx_export.denoiser(cross)
    props = {p.key: p.value for p in onnx.load_from_string(model).metadata_props}
    assert props[ROWS_PER_ITEM] == str(spec.positions)
    tokens, c = cross.mixer.where.shape
    extra = sum(graph.node_macs(model).values()) - sum(graph.node_macs(onnx_export.denoiser(plain)).values())
    assert extra == (4 * tokens * c * c + 2 * tokens * tokens * c) // spec.positions
    assert graph.activation_bytes(model) > graph.activation_bytes(onnx_export.denoiser(plain))


def test_the_runtime_samples_what_the_torch_sampler_does(crossed):
    """Same network (fp32), noise and neighbours: the runtime's whole-image calls, guided (two
    halves of whole images), give the torch sampler's images."""
    bundle, _ = crossed
    spec = Spec.from_manifest(bundle.manifest)
    assert spec.cross_block and spec.blocks_together == spec.rows_per_item == spec.positions == 4
    assert [spec.whole_items(r) for r in (1, 4, 5, 8)] == [4, 4, 8, 8]       # timing probes call whole images
    check_runtime_matches_torch(*crossed)


def test_an_image_is_the_same_alone_in_a_batch_and_on_two_threads(crossed):
    check_alone_batched_and_threaded(crossed[0], guidance=2.0)


def test_a_manifest_that_disagrees_with_the_graph_is_refused_in_one_line(base, crossed):
    spec = Spec.from_manifest(base[0])
    plain = onnx_export.denoiser(_bundle_net(spec, cross=False))
    for model, cross, says in ((crossed[0].read("denoiser.onnx"), False, "false"), (plain, True, "true")):
        with pytest.raises(BundleError, match=f"denoiser.cross_block = {says}") as e:
            Generator.open(_with_denoiser(base, model, cross))
        assert "\n" not in str(e.value)
    manifest = copy.deepcopy(base[0])
    for bad in ("yes", 1):
        manifest["denoiser"]["cross_block"] = bad
        with pytest.raises(BundleError, match="denoiser.cross_block"):
            Spec.from_manifest(manifest)
    manifest["denoiser"]["cross_block"] = True
    manifest["blocks"] = {"per_side": 1, "side": spec.latent_side}
    with pytest.raises(BundleError, match="denoiser.cross_block is true for a model with one block"):
        Spec.from_manifest(manifest)


def test_a_cross_block_fine_tune_of_a_bundle_exports_over_it_in_int8(base, tmp_path):
    """The export route a trained cross-block denoiser takes: int8 calibration on whole images,
    the exact graph rewrites, and a bundle the runtime and `info` read."""
    spec = Spec.from_manifest(base[0])
    cfg = config.resolve("tiny", {"denoiser": {"cross_block": True, "batch_size": 8}})
    net = _bundle_net(spec)
    config.save(cfg, tmp_path / "config.json")
    checkpoint.save(tmp_path / "denoiser.safetensors", 1, {"model": net, "ema": copy.deepcopy(net)}, {})
    (tmp_path / distill.TEACHER_BUNDLE).write_bytes(shipped.resolve("fashion-mnist").read_bytes())
    out = tmp_path / "tuned.rissole"
    manifest = exporter.export(tmp_path, out, mode="int8", calibration_samples=2, log=lambda *a: None)
    assert manifest["denoiser"]["cross_block"] is True and manifest["denoiser"]["border"] == 0
    assert "static-reshapes" in manifest["graph"]["denoiser_rewrites"]
    assert manifest["parity"]["int8_vs_fp32_psnr_mean"] > 25
    with Generator.open(out, threads=1) as gen:
        assert gen.generate(2, seed=1, steps=2, as_array=True).shape[0] == 2
    assert "attention across the blocks of an image" in cli("info", str(out), check=True).stdout


def test_a_memory_budget_of_one_image_generates_what_an_unbounded_run_does(crossed, monkeypatch):
    """The tightest plan still calls the graph on a whole image, never on part of one."""
    check_one_image_budget(crossed[0], monkeypatch)


# ---------------------------------------------------------------- trained: train -> distil -> export -> runtime

def test_a_cross_block_run_distils_into_a_student_that_exports_and_generates(tiny_run, tiny_config, tmp_path):
    """The tiny run's autoencoder and database, a cross-block denoiser trained on them, a 2-step
    student of it (trained on whole images: the teacher's graph needs them), its int8 bundle.
    Its teacher can't be rebuilt from a bundle (no weight map for the attention): one line."""
    run = train_variant(tiny_run, tiny_config, tmp_path / "run", settings="cross_block = true\nbatch_size = 16")
    variant = tmp_path / "run.toml"
    teacher_bundle = tmp_path / "teacher.rissole"
    cli("export", str(run), "-o", str(teacher_bundle), "--quantize", "fp32", "--calibration-samples", "2", check=True)
    refused = cli("distill", str(teacher_bundle), "--steps", "2", "--out", str(tmp_path / "no"), "--preset", "tiny",
                  "--config", str(variant))
    assert refused.returncode != 0 and "distil its training run instead" in refused.stderr
    assert "Traceback" not in refused.stderr
    student = tmp_path / "student"
    distill.distill(run, 2, student, progress=False, train_steps=4, batch_size=8, checkpoint_every=2, teacher_steps=6)
    out = tmp_path / "student.rissole"
    cli("export", str(student), "-o", str(out), "--calibration-samples", "4", check=True)
    assert Bundle.open(out).manifest["denoiser"]["cross_block"] is True
    png = tmp_path / "png"
    cli("generate", "-m", str(out), "-n", "3", "-o", str(png), check=True)
    assert len(list(png.glob("*.png"))) == 3
