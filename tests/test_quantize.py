"""export/quantize.py: the denoiser's int8 recipe (sensitive convolutions in fp32, bias correction).

Why the recipe is what it is was measured on the shipped model (benchmarks/ablations/
int8_study.py); these tests check that it does what it says on a small random denoiser.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from rissole_export import onnx_export, quantize
from rissole_export.denoiser import UNet


@pytest.fixture(scope="module")
def fp32() -> bytes:
    torch.manual_seed(0)
    net = UNet(2, 4, 1, 4, 8, (1, 2), 1, "add").eval()
    with torch.no_grad():        # non-trivial norms and output conv, as in a trained net
        for name, p in net.named_parameters():
            if "norm" in name or name.startswith("out."):
                p.add_(torch.randn_like(p) * 0.3)
    return onnx_export.denoiser(net)


def _calls(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((16, 2, 4, 4)).astype(np.float32),
             "t": rng.uniform(0, 999, 16).astype(np.float32),
             "pos": rng.integers(0, 4, 16).astype(np.int64),
             "cond": rng.standard_normal((16, 2, 4, 4)).astype(np.float32)} for _ in range(n)]


def _quantized_convs(model: bytes) -> list[onnx.NodeProto]:
    """Convs whose bias is an int32 DequantizeLinear, i.e. the ones bias correction moves."""
    graph = onnx.load_from_string(model).graph
    producer = {o: n for n in graph.node for o in n.output}
    return [n for n in graph.node if n.op_type == "Conv" and len(n.input) > 2
            and getattr(producer.get(n.input[2]), "op_type", None) == "DequantizeLinear"]


def _bias_steps(model: bytes, conv: onnx.NodeProto) -> np.ndarray:
    graph = onnx.load_from_string(model).graph
    producer = {o: n for n in graph.node for o in n.output}
    scale = producer[conv.input[2]].input[1]
    return numpy_helper.to_array(next(i for i in graph.initializer if i.name == scale))


def test_bias_correction_matches_each_convs_channel_means_to_fp32(fp32: bytes) -> None:
    calls = _calls(4, 1)
    plain, _ = quantize.quantize(fp32, calls, "x86", keep_fp32=True)
    corrected, info = quantize.quantize(fp32, calls, "x86", keep_fp32=True, correct_bias=True)
    assert info["bias_correction"] and onnx.load_from_string(plain).graph.node == onnx.load_from_string(corrected).graph.node
    convs = _quantized_convs(corrected)
    names = [c.output[0] for c in convs]
    want = quantize._channel_means(onnx.load_from_string(fp32), names, calls)
    before = quantize._channel_means(onnx.load_from_string(plain), names, calls)
    after = quantize._channel_means(onnx.load_from_string(corrected), names, calls)
    gaps_before = [np.abs(b - w).max() for b, w in zip(before, want)]
    for conv, a, w in zip(convs, after, want):     # each mean within half a bias step (plus float noise)
        assert np.all(np.abs(a - w) <= _bias_steps(corrected, conv) / 2 + 1e-5 * (1 + np.abs(w))), conv.name
    assert max(gaps_before) > 10 * max(np.abs(a - w).max() for a, w in zip(after, want))


def test_bias_correction_lowers_the_error_on_unseen_calls(fp32: bytes) -> None:
    import onnxruntime as ort
    calls, unseen = _calls(4, 1), _calls(2, 7)

    def error(model: bytes) -> float:
        ref = ort.InferenceSession(fp32, providers=["CPUExecutionProvider"])
        got = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        return float(np.mean([np.mean((ref.run(None, c)[0] - got.run(None, c)[0]) ** 2) for c in unseen]))

    plain, _ = quantize.quantize(fp32, calls, "x86", keep_fp32=True)
    corrected, _ = quantize.quantize(fp32, calls, "x86", keep_fp32=True, correct_bias=True)
    assert error(corrected) < error(plain)


def test_the_last_pointwise_conv_stays_fp32(fp32: bytes) -> None:
    kept = quantize.sensitive_convs(fp32)
    assert kept[:len(quantize.edge_convs(fp32))] == quantize.edge_convs(fp32)
    assert kept[-1] == "/net/up.4/skip/Conv"       # the last residual block's 1x1 skip path
    model, info = quantize.quantize(fp32, _calls(2, 1), "x86", keep_fp32=True)
    assert info["fp32_nodes"] == kept
    assert "/net/up.4/skip/Conv" not in {c.name for c in _quantized_convs(model)}
    assert "/net/up.3/skip/Conv" in {c.name for c in _quantized_convs(model)}
