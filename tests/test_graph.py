"""export/graph.py: true MAC counts, and denoiser and decoder rewrites that keep every output bit.

The rewrites are only worth shipping if they are exact, so every test here compares outputs
with np.array_equal (no tolerance), on random calls and on whole generated images through the
runtime, and one test breaks a rewrite on purpose to show the comparison catches it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rissole_edge.bundle import Bundle
from rissole_edge.generator import Generator
from rissole_export import graph, onnx_export, quantize
from rissole_export.denoiser import UNet

MODELS = Path(__file__).resolve().parents[1] / "models"


def _unet(latent_channels: int, block_size: int, k: int, channels: int, res_blocks: int, seed: int = 0) -> UNet:
    """A small denoiser with random weights, its GroupNorm affines and output conv included
    (left at their init, gamma = 1, beta = 0 and a zero output conv would hide mistakes)."""
    torch.manual_seed(seed)
    net = UNet(latent_channels, block_size, k, 4, channels, (1, 2), res_blocks, "add").eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name or name.startswith("out."):
                p.add_(torch.randn_like(p) * 0.3)
    return net


def _feeds(net: UNet, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    c, s = net.latent_channels, net.block_size
    return {"x": rng.standard_normal((batch, c, s, s)).astype(np.float32),
            "t": rng.uniform(0, 999, batch).astype(np.float32),
            "pos": rng.integers(0, net.positions, batch).astype(np.int64),
            "cond": rng.standard_normal((batch, net.k * c, s, s)).astype(np.float32)}


def _int8(net: UNet) -> bytes:
    """The net as the exporter ships it: QDQ int8, edge convolutions in fp32."""
    calibration = [_feeds(net, 16, seed) for seed in range(4)]
    model, _ = quantize.quantize(onnx_export.denoiser(net), calibration, "x86", keep_fp32=True, correct_bias=True)
    return model


@pytest.fixture(scope="module")
def tiny() -> UNet:
    """Blocks of 2x2: its maps are 2x2 and 1x1, the sizes the GEMM rewrite targets."""
    return _unet(latent_channels=2, block_size=2, k=1, channels=4, res_blocks=1)


@pytest.fixture(scope="module")
def tiny_int8(tiny: UNet) -> bytes:
    return _int8(tiny)


def test_macs_match_a_hand_count(tiny: UNet, tiny_int8: bytes) -> None:
    # latent 2 channels, 2x2 blocks, k = 1 (additive fusion), widths 4 and 8, emb 8, one res block.
    # Convolutions: positions * out channels * in channels * kernel taps; Linear: in * out.
    hand = [
        4 * 8, 8 * 8,                                              # time MLP
        4 * 4 * 2 * 9, 4 * 4 * 2 * 9,                              # conv_in, cond_in (2x2 map)
        4 * 4 * 4 * 9, 8 * 4, 4 * 4 * 4 * 9,                       # down.0 ResBlock(4, 4) at 2x2
        1 * 4 * 4 * 9,                                             # down.1 Downsample 2x2 -> 1x1
        1 * 8 * 4 * 9, 8 * 8, 1 * 8 * 8 * 9, 1 * 8 * 4,            # down.2 ResBlock(4, 8) at 1x1, 1x1 skip
        2 * (1 * 8 * 8 * 9 + 8 * 8 + 1 * 8 * 8 * 9),               # mid: two ResBlock(8, 8) at 1x1
        1 * 8 * 16 * 9, 8 * 8, 1 * 8 * 8 * 9, 1 * 8 * 16,          # up.0 ResBlock(16, 8) at 1x1
        1 * 8 * 12 * 9, 8 * 8, 1 * 8 * 8 * 9, 1 * 8 * 12,          # up.1 ResBlock(12, 8) at 1x1
        4 * 8 * 8 * 9,                                             # up.2 Upsample: conv at 2x2
        4 * 4 * 12 * 9, 8 * 4, 4 * 4 * 4 * 9, 4 * 4 * 12,          # up.3 ResBlock(12, 4) at 2x2
        4 * 4 * 8 * 9, 8 * 4, 4 * 4 * 4 * 9, 4 * 4 * 8,            # up.4 ResBlock(8, 4) at 2x2
        4 * 2 * 4 * 9,                                             # out conv
    ]
    assert sum(graph.node_macs(onnx_export.denoiser(tiny)).values()) == sum(hand)
    assert sum(graph.node_macs(tiny_int8).values()) == sum(hand)        # weights behind DequantizeLinear


def test_activation_bytes_count_every_per_item_value_and_no_weight() -> None:
    """x (N,3) -> Reshape (N,3,1) -> Mul by a dequantized weight -> y: per item 12 bytes of x,
    12 of the reshape, 12 of y; the weight's DequantizeLinear output (computed once, not per
    item) and the weights themselves do not count."""
    weight = [onnx.numpy_helper.from_array(np.array([1, 2, 3], np.int8).reshape(3, 1), "wq"),
              onnx.numpy_helper.from_array(np.array(0.5, np.float32), "ws"),
              onnx.numpy_helper.from_array(np.array([-1, 3, 1], np.int64), "shape")]
    nodes = [onnx.helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"]),
             onnx.helper.make_node("Reshape", ["x", "shape"], ["r"]),
             onnx.helper.make_node("Mul", ["r", "w"], ["y"])]
    g = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3, 1])], weight)
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    assert graph.activation_bytes(model.SerializeToString()) == 3 * 12


def _torch_macs(net: UNet, feeds: dict) -> int:
    """MACs per item counted from the torch module's own layers, by hooks on one call."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            total += output[0].numel() * module.weight[0].numel()
        else:
            total += output[0].numel() * module.in_features
    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        net(*[torch.from_numpy(feeds[k]) for k in ("x", "t", "pos", "cond")])
    for h in handles:
        h.remove()
    return total


@pytest.mark.slow
def test_shipped_geometry_counts_8_43_m_macs_like_the_torch_module() -> None:
    """The fashion recipe's denoiser (random weights: the count depends on shapes only), counted
    on its ONNX graph and by torch hooks; ONNX shape inference alone loses most convolutions."""
    net = UNet(4, 4, 4, 4, 40, (1, 2), 2, "add").eval()
    model = onnx_export.denoiser(net)
    count = sum(graph.node_macs(model).values())
    assert count == _torch_macs(net, _feeds(net, 1, 0)) == 8_432_640
    inferred = onnx.shape_inference.infer_shapes(onnx.load_from_string(model))
    known = {v.name for v in inferred.graph.value_info
             if all(d.dim_value > 0 for d in v.type.tensor_type.shape.dim[1:])}
    convs = [n for n in inferred.graph.node if n.op_type == "Conv"]
    assert sum(n.output[0] in known for n in convs) < len(convs) / 2


@pytest.mark.parametrize("names", [[name] for name in graph.DEFAULT_REWRITES] + [list(graph.DEFAULT_REWRITES)])
def test_rewrites_are_bit_identical(tiny: UNet, tiny_int8: bytes, names: list[str]) -> None:
    rewritten = graph.rewrite(tiny_int8, names)
    assert rewritten != tiny_int8                                  # it did rewrite something
    for batch, seed in ((1, 1), (5, 2), (64, 3)):
        assert graph.same_outputs(tiny_int8, rewritten, _feeds(tiny, batch, seed))
    assert graph.rewrite(rewritten, names) == rewritten or \
        graph.same_outputs(rewritten, graph.rewrite(rewritten, names), _feeds(tiny, 3, 4))


def test_convs_on_small_maps_become_fused_int8_gemms(tiny_int8: bytes, tmp_path: Path) -> None:
    shapes = graph.value_shapes(tiny_int8)
    rewritten = graph.convs_as_gemm(tiny_int8, shapes)
    kept = [n for n in onnx.load_from_string(rewritten).graph.node if n.op_type == "Conv"]
    # Left as convolutions: the fp32 edge convs and the 1x1 skip convs on 2x2 maps (a GEMM
    # over the map would multiply 4x the MACs there).
    assert {n.name for n in kept} == set(quantize.edge_convs(tiny_int8)) | {"/net/up.3/skip/Conv", "/net/up.4/skip/Conv"}
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(rewritten, options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert ops.count("QGemm") == len([n for n in onnx.load_from_string(rewritten).graph.node if n.op_type == "Gemm"
                                      and n.name.endswith("_as_gemm")]) > 0


def test_embedding_adds_lose_their_broadcast(tiny_int8: bytes) -> None:
    """The timestep embedding's (N,C,1,1) Adds on the 2x2 maps become same-shape Adds (on the
    1x1 maps there is nothing to broadcast)."""
    adds = graph.expand_embedding_adds(tiny_int8, graph.value_shapes(tiny_int8))
    shapes = graph.value_shapes(adds)
    pairs = [[shapes[i] for i in n.input] for n in onnx.load_from_string(adds).graph.node if n.op_type == "Add"]
    per_item = [p for p in pairs if len(p[0]) == len(p[1]) == 4]          # not the GroupNorm constants
    assert [p for p in per_item if p[0] == p[1] == (1, 4, 2, 2)]
    assert all(p[0] == p[1] or max(p[0][2:] + p[1][2:]) == 1 for p in per_item)


def test_static_reshapes_leave_graphs_with_free_spatial_axes_alone(tiny_int8: bytes) -> None:
    """Shapes read from one run hold for every call only when the batch is the one free axis."""
    proto = onnx.load_from_string(tiny_int8)
    for dim in proto.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "side"
    free = proto.SerializeToString()
    assert graph.static_reshapes(free, graph.value_shapes(tiny_int8)) == free
    assert graph.static_reshapes(tiny_int8, graph.value_shapes(tiny_int8)) != tiny_int8


@pytest.mark.parametrize("channels", [3, 1])
def test_decoder_rewrites_are_bit_identical_and_do_what_they_say(channels: int) -> None:
    """An int8 decoder of random weights (16x16 latent; RGB as twemoji's, grey as
    fashion-mnist's, whose 1-filter conv has per-tensor scales): the codebook lookup's computed
    reshape targets and every GroupNorm's become constants (no Shape kernel is left), the
    output conv gets 16 filters and a Slice, and no output bit moves. The rewritten graph must
    also run unoptimised: onnxruntime's int8 conv fusion skips its DequantizeLinear nodes, so a
    bad per-channel scale or zero point only shows there."""
    from rissole_export.autoencoder import VQAutoencoder
    from rissole_export.config import AutoencoderConfig

    torch.manual_seed(0)
    ae = VQAutoencoder(channels, AutoencoderConfig(channels=8, channel_mult=(1, 2), latent_channels=4, codebook_size=32))
    rng = np.random.default_rng(0)
    feeds = [{"latent": rng.standard_normal((4, 4, 16, 16)).astype(np.float32)} for _ in range(3)]
    decoder, _ = quantize.quantize(onnx_export.decoder(ae.eval(), 1.0, 16), feeds, "x86")
    rewritten, applied = graph.optimize_decoder(decoder)
    assert applied == list(graph.DECODER_REWRITES)
    for batch in (1, 5, 16):
        assert graph.same_outputs(decoder, rewritten, {"latent": rng.standard_normal((batch, 4, 16, 16)).astype(np.float32)})
    proto = onnx.load_from_string(rewritten)
    ops = [n.op_type for n in proto.graph.node]
    assert "Shape" in [n.op_type for n in onnx.load_from_string(decoder).graph.node] and "Shape" not in ops
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    out_channels = [inits[producer[n.input[1]].input[0]].shape[0] for n in proto.graph.node if n.op_type == "Conv"]
    assert min(out_channels) == 8 and out_channels[-1] == 16 and ops.count("Slice") == 1
    assert graph.optimize_decoder(rewritten)[0] == rewritten                   # a second pass changes nothing
    onnx.checker.check_model(proto, full_check=True)
    assert graph.runs_unoptimised(rewritten, feeds[0])


def test_a_wrong_rewrite_is_caught(tiny: UNet, tiny_int8: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity check can fail: one weight tap moved in the GEMM matrix changes outputs,
    and optimize() leaves such a rewrite out."""
    exact = graph._dense_conv_matrix
    monkeypatch.setattr(graph, "_dense_conv_matrix", lambda *a: np.roll(exact(*a), 1, axis=1))
    wrong = graph.rewrite(tiny_int8, ["convs-as-gemm"])
    assert not graph.same_outputs(tiny_int8, wrong, _feeds(tiny, 8, 5))
    model, record = graph.optimize(tiny_int8)
    assert record["denoiser_rewrites"] == [n for n in graph.DEFAULT_REWRITES if n != "convs-as-gemm"]
    assert graph.same_outputs(tiny_int8, model, _feeds(tiny, 8, 5))


@pytest.mark.slow
def test_generated_images_are_identical_through_the_runtime() -> None:
    """A denoiser of the shipped fashion geometry, its rewritten twin, the shipped database:
    whole images generated by the runtime (real neighbour blocks as inputs) are equal. The
    original goes in a bundle as older exporters wrote them (no `graph` record): it loads
    unchanged."""
    shipped = Bundle.open(MODELS / "fashion-mnist.rissole")
    members = {name: shipped.read(name) for name in shipped.members}
    old_manifest = {k: v for k, v in shipped.manifest.items() if k not in ("members", "graph")}
    original = _int8(_unet(latent_channels=4, block_size=4, k=4, channels=8, res_blocks=1, seed=1))
    rewritten, record = graph.optimize(original)
    assert record["denoiser_executed_macs_per_block"] < record["denoiser_macs_per_block"]
    images = []
    for model, manifest in ((original, old_manifest), (rewritten, {**old_manifest, "graph": record})):
        bundle = Bundle.in_memory(manifest, {**members, "denoiser.onnx": model})
        with Generator.open(bundle, threads=1) as g:
            images.append(g.generate(6, seed=7, steps=4, as_array=True))
    assert images[0].std() > 0 and np.array_equal(images[0], images[1])


@pytest.mark.slow
def test_rewrite_bundle_keeps_the_manifest_and_the_images(tmp_path: Path) -> None:
    source = MODELS / "fashion-mnist.rissole"
    out = tmp_path / "rewritten.rissole"
    manifest = graph.rewrite_bundle(source, out)
    before = Bundle.open(source).manifest
    assert {k: v for k, v in manifest.items() if k != "graph"} == \
        {k: v for k, v in before.items() if k not in ("graph", "members", "format_version")}
    assert manifest["graph"]["denoiser_macs_per_block"] == 6_007_040      # res_blocks 1
    assert manifest["graph"]["denoiser_rewrites"] == list(graph.DEFAULT_REWRITES)
    assert manifest["graph"]["decoder_rewrites"] == list(graph.DECODER_REWRITES)
    with Generator.open(source, threads=1) as a, Generator.open(out, threads=1) as b:
        assert np.array_equal(a.generate(3, seed=2, steps=3, as_array=True), b.generate(3, seed=2, steps=3, as_array=True))
