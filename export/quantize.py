"""int8 static quantization with onnxruntime.quantization, calibrated on real inputs.

Why onnxruntime.quantization and not optimum's ORTQuantizer: optimum wraps the same
`quantize_static`, but needs transformers and a `datasets`-style calibration set and pins older
versions; our calibration data are arrays we already hold, so the direct API is smaller and
clearer. The recipe, as measured when it was chosen: static QDQ, per-channel weights, Conv
only (quantizing the timestep path and every activation wrecks accuracy; dynamic quantization
makes convolutions slower).

The denoiser's recipe (`keep_fp32` and `correct_bias`) was chosen on the fashion bundle's
res_blocks 1 denoiser (issue 16), int8 vs fp32 image PSNR at 25 steps. The decoder snaps each
latent pixel to its nearest code, so a latent error flips a code now and then, and a flipped
code repaints a 4x4 patch: an image's PSNR falls by steps with its flips (about 3 per image of
64 codes with the plain recipe), and the worst image of a set is the one with most flips. Flips
scale with the latent error, so only a smaller error helps. Measured with
benchmarks/ablations/int8_study.py (benchmarks/results/int8.md), mean / worst dB on 64 images:
plain 39.0 / 29.9. Percentile or Distribution calibration, moving-average ranges, 4x the
calibration trajectories or another draw of them, and symmetric s8 activations (2.6x the call)
were worse or equal; Entropy gave the same model as MinMax. What pays, at no measurable cost in
call time: mean-output bias correction (`correct_biases`) and the last 1x1 skip convolution in
fp32 (`sensitive_convs`); together the latent error falls from 1.31% to 1.02% of its RMS: 42.6 /
31.2 dB, and 7 -> 0 (seed 1234) and 7 -> 2 (seed 99) of 256 images under 31 dB (the worst of the
seed-99 set stays at 29.0, 28.8 before). The 3x3 convs next in line cost 2-17% of the call each
in fp32; six of them halve the error at 1.35x the call.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quant_pre_process, quantize_static)

# target -> (activation type, weight type). x86 with VNNI/AVX2 runs U8S8 fastest (S8S8 is slower
# there); on arm64 (Raspberry Pi class) onnxruntime's int8 GEMM kernels favour S8S8.
TARGETS = {
    "x86": (QuantType.QUInt8, QuantType.QInt8),
    "arm64": (QuantType.QInt8, QuantType.QInt8),
}
OP_TYPES = ["Conv"]


def edge_convs(model: bytes) -> list[str]:
    """The convolutions that read a graph input or write the last output: kept in fp32.

    Measured on the small Fashion-MNIST run (16 images, 25 DDIM steps, int8 vs fp32 images):
    quantizing every Conv of the denoiser gives 34.1 dB; keeping these three in fp32, 43.1 dB.
    They are 3 of about 25 convolutions, so the speed-up barely changes."""
    graph = onnx.load_from_string(model).graph
    inputs = {i.name for i in graph.input}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    return [n.name for n in convs if n.input[0] in inputs] + [convs[-1].name]


def sensitive_convs(model: bytes) -> list[str]:
    """The convolutions a denoiser keeps in fp32: `edge_convs` and the last 1x1 convolution (the
    skip path of the last residual block, which adds straight into the output head). Quantized
    alone, that 1x1 conv makes the largest latent error of all on the fashion denoiser (0.67%
    of the latent's RMS, against 1.31% with every conv int8); in fp32 it costs nothing
    measurable in call time (its input's quantization goes away with it), unlike the 3x3 convs
    next in line (2-17% each)."""
    convs = [n for n in onnx.load_from_string(model).graph.node if n.op_type == "Conv"]
    pointwise = [n.name for n in convs if any(a.name == "kernel_shape" and list(a.ints) == [1, 1]
                                               for a in n.attribute)]
    return list(dict.fromkeys(edge_convs(model) + pointwise[-1:]))


class _Reader(CalibrationDataReader):
    def __init__(self, feeds: list[dict]):
        self._it = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self._it, None)


def _channel_means(model: onnx.ModelProto, names: list[str], feeds: list[dict]) -> list[np.ndarray]:
    """Per-channel means of the tensors `names` (N, C, H, W) over all calibration calls."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    listed = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in listed)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in sess.get_inputs()}
    sums = [np.zeros(1) for _ in names]
    counts = [0] * len(names)
    for feed in feeds:
        for j, got in enumerate(sess.run(names, {k: v for k, v in feed.items() if k in inputs})):
            sums[j] = sums[j] + got.astype(np.float64).sum(axis=(0, 2, 3))
            counts[j] += got.size // got.shape[1]
    return [s / c for s, c in zip(sums, counts)]


def correct_biases(fp32: bytes, qdq: bytes, feeds: list[dict]) -> bytes:
    """Empirical bias correction: each quantized convolution's int32 bias moved so that its
    per-channel mean output over the calibration calls equals the fp32 model's, conv by conv in
    graph order (each measured with the ones before it already corrected). Quantization errors
    are not zero-mean (rounded weights times inputs with a non-zero mean, such as SiLU outputs,
    and per-tensor activation steps), and a constant shift per channel is what diffusion
    sampling accumulates most over its steps. Only bias values change: the graph and its speed
    do not."""
    q = onnx.load_from_string(qdq)
    producer = {o: n for n in q.graph.node for o in n.output}
    inits = {i.name: i for i in q.graph.initializer}
    convs = [n for n in q.graph.node if n.op_type == "Conv" and len(n.input) > 2
             and getattr(producer.get(n.input[2]), "op_type", None) == "DequantizeLinear"]
    wanted = _channel_means(onnx.load_from_string(fp32), [n.output[0] for n in convs], feeds)
    for conv, want in zip(convs, wanted):
        got = _channel_means(q, [conv.output[0]], feeds)[0]
        bias, scale = producer[conv.input[2]].input[:2]
        step = numpy_helper.to_array(inits[scale]).astype(np.float64)
        value = numpy_helper.to_array(inits[bias]).astype(np.int64) + np.round((want - got) / step).astype(np.int64)
        info = np.iinfo(np.int32)
        inits[bias].CopyFrom(numpy_helper.from_array(np.clip(value, info.min, info.max).astype(np.int32), bias))
    return q.SerializeToString()


def static(model: bytes, feeds: list[dict], activations: QuantType, weights: QuantType, fp32_nodes: list[str],
           method: CalibrationMethod = CalibrationMethod.MinMax, extra_options: dict | None = None) -> bytes:
    """onnxruntime's static QDQ quantization of the Convs not in `fp32_nodes`, per-channel weights
    (`quantize` is the recipe; benchmarks/ablations/int8_study.py varies the method and options)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = Path(tmp, "in.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "out.onnx")
        src.write_bytes(model)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), _Reader(feeds), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=activations, weight_type=weights,
                        op_types_to_quantize=OP_TYPES, calibrate_method=method, nodes_to_exclude=fp32_nodes,
                        extra_options={"ActivationSymmetric": activations == QuantType.QInt8, **(extra_options or {})})
        return out.read_bytes()


def quantize(model: bytes, feeds: list[dict], target: str, keep_fp32: bool = False,
             correct_bias: bool = False) -> tuple[bytes, dict]:
    """Return the int8 model and a description of how it was quantized (for the manifest).
    `keep_fp32` leaves the denoiser's sensitive convolutions in fp32 (`sensitive_convs`);
    `correct_bias` corrects the biases on the calibration calls (`correct_biases`)."""
    activations, weights = TARGETS[target]
    excluded = sensitive_convs(model) if keep_fp32 else []
    quantized = static(model, feeds, activations, weights, excluded)
    if correct_bias:
        quantized = correct_biases(model, quantized, feeds)
    return quantized, {
        "format": "QDQ", "target": target, "activations": activations.name, "weights": weights.name,
        "per_channel": True, "op_types": OP_TYPES, "calibration": "MinMax", "calibration_batches": len(feeds),
        "fp32_nodes": excluded, "bias_correction": correct_bias,
    }
