"""The one place that reads shapes from, counts and rewrites the ONNX graphs a bundle ships.

Why rewrite at all: the denoiser runs on blocks of 4x4 or 8x8 latents, whose maps shrink to
2x2 inside the UNet. On maps that small, onnxruntime's CPU kernels spend their time on
per-channel broadcasts and on convolution padding, not on arithmetic (benchmarks/op_profile.py).
The decoder runs once per image, on 8x8 to 64x64 maps: at 4 sampling steps it is a fifth of an
image's time, and two rewrites (`DECODER_REWRITES`) take a tenth off it.
Every rewrite here is exact: it changes how the same numbers are computed, never which, so the
rewritten graph's outputs are bit-identical to the original's (tests/test_graph.py proves it
on every rewrite) and a shipped bundle can be rewritten without its training run.

Shapes come from running the model once on one batch item with every intermediate value as
an output, not from ONNX shape inference, which loses them after the GroupNorm reshapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from rissole_edge.bundle import ROWS_PER_ITEM, Bundle

from . import pack

Shapes = dict[str, tuple[int, ...]]

# A graph whose rows only make sense together (a denoiser with attention across blocks takes
# whole images, P rows each) says so in its metadata, ROWS_PER_ITEM (onnx_export.denoiser sets
# it, the runtime checks it). Feeds built here hold whole items of that many rows.


def rows_per_item(model: onnx.ModelProto) -> int:
    """Rows one item of the graph holds (1 unless the graph says otherwise)."""
    props = {p.key: p.value for p in model.metadata_props}
    return int(props.get(ROWS_PER_ITEM, 1))


# ------------------------------------------------------------------ shapes and MACs

def _zero_feeds(model: onnx.ModelProto, batch: int) -> dict[str, np.ndarray]:
    """Zeros of every graph input's declared type, with free axes set to `batch` items' rows.
    Integer inputs (block positions) count 0, 1, ... within an item: a valid position for
    every row, and the order a graph that mixes an item's rows expects."""
    initializers = {i.name for i in model.graph.initializer}
    rows = rows_per_item(model)
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.dim_value > 0 else batch * rows for d in tensor.shape.dim]
        feeds[value.name] = np.zeros(dims, helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        if feeds[value.name].dtype.kind == "i" and rows > 1:
            feeds[value.name] = np.resize(np.arange(rows, dtype=feeds[value.name].dtype), dims)
    return feeds


def _all_values(model: bytes, batch: int = 1) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Every value the graph computes (its inputs and outputs included) for a batch of `batch`
    items of zeros, by running it once with every intermediate value as an output."""
    proto = onnx.load_from_string(model)
    declared = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in node.output
                                  if name and name not in declared)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = _zero_feeds(proto, batch)
    names = [o.name for o in sess.get_outputs()]
    return proto, {**dict(zip(names, sess.run(names, feeds))), **feeds}


def value_shapes(model: bytes) -> Shapes:
    """The shape of every value of the graph for a batch of one item, weights included."""
    proto, values = _all_values(model)
    shapes = {name: tuple(v.shape) for name, v in values.items()}
    shapes.update({i.name: tuple(i.dims) for i in proto.graph.initializer})
    return shapes


def activation_bytes(model: bytes) -> int:
    """Bytes of every value one row makes the graph compute, inputs and outputs included,
    weights not: an upper bound on what one more row in a call costs (the memory planner's
    unit, `memory.block_bytes`; an item of several rows counts its share per row). Counted
    from one run, like `value_shapes`: ONNX shape inference loses the shapes after the
    GroupNorm reshapes and counted 221 KB of the fashion denoiser's 583 KB."""
    proto, values = _all_values(model)
    per_item = {i.name for i in proto.graph.input} - {i.name for i in proto.graph.initializer}
    for node in proto.graph.node:             # topological order: skip what only weights make
        if any(i in per_item for i in node.input):
            per_item.update(node.output)
    return -(-sum(v.nbytes for name, v in values.items() if name in per_item) // rows_per_item(proto))


def _weight_dims(graph: onnx.GraphProto, name: str) -> tuple[int, ...] | None:
    """Dims of a weight given directly or through a DequantizeLinear of an initializer."""
    initializers = {i.name: tuple(i.dims) for i in graph.initializer}
    if name in initializers:
        return initializers[name]
    producer = next((n for n in graph.node if name in n.output), None)
    if producer is not None and producer.op_type == "DequantizeLinear":
        return initializers.get(producer.input[0])
    return None


def node_macs(model: bytes, shapes: Shapes | None = None) -> dict[str, int]:
    """Multiply-accumulates per row (per block) of every Conv, Gemm and MatMul node (by node
    name): output elements times the inputs each one sums over (weight elements per output
    channel); an item of several rows counts its share per row."""
    shapes = shapes or value_shapes(model)
    proto = onnx.load_from_string(model)
    graph, rows = proto.graph, rows_per_item(proto)
    macs = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        out = shapes[node.output[0]]
        if node.op_type == "Conv":
            w = _weight_dims(graph, node.input[1]) or shapes[node.input[1]]
            per_output = int(np.prod(w[1:]))
        else:
            a = shapes[node.input[0]]
            transposed = node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute)
            per_output = a[-2] if transposed else a[-1]
        macs[node.name] = -(-int(np.prod(out)) * per_output // rows)
    return macs


# ------------------------------------------------------------------ graph editing helpers

class _Graph:
    """Indexes over one graph being edited: producers, consumers, initializers."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.init = {i.name: i for i in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self._count = 0

    def array(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.init[name]) if name in self.init else None

    def add_initializer(self, array: np.ndarray, hint: str) -> str:
        self._count += 1
        name = f"{hint}_rw{self._count}"
        tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.init[name] = tensor
        return name

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_rw{self._count}"

    def finish(self) -> bytes:
        """Drop nodes and initializers nothing reads any more, sort, check, serialise."""
        _topological_sort(self.graph)
        needed = {o.name for o in self.graph.output}
        keep = []
        for node in reversed(list(self.graph.node)):
            if any(o in needed for o in node.output):
                keep.append(node)
                needed.update(node.input)
        del self.graph.node[:]
        self.graph.node.extend(reversed(keep))
        unused = [i for i in self.graph.initializer if i.name not in needed]
        for i in unused:
            self.graph.initializer.remove(i)
        onnx.checker.check_model(self.model, full_check=False)
        return self.model.SerializeToString()


def _topological_sort(graph: onnx.GraphProto) -> None:
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError("the rewritten graph has a cycle or a dangling input")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_axis(node: onnx.NodeProto, axis: int) -> None:
    """Set a (De)QuantizeLinear's axis, replacing any it has."""
    for a in [a for a in node.attribute if a.name == "axis"]:
        node.attribute.remove(a)
    node.attribute.append(helper.make_attribute("axis", axis))


# ------------------------------------------------------------------ rewrites

def expand_broadcasts(model: bytes, shapes: Shapes, max_positions: int = 64) -> bytes:
    """Per-channel Mul/Add constants of shape (C,1,1) (the GroupNorm gamma and beta) applied
    to maps of at most `max_positions` pixels are stored expanded to (C,H,W). The products and
    sums are the same numbers; onnxruntime's element-wise kernels are far faster without a
    broadcast whose inner span is only 4 to 64 floats (benchmarks/results/profile.md: 0.73x
    the fashion call, 0.91x the twemoji call with its 8x8 maps)."""
    g = _Graph(onnx.load_from_string(model))
    for node in g.graph.node:
        if node.op_type not in ("Mul", "Add"):
            continue
        for slot, name in enumerate(node.input):
            const = g.array(name)
            other = shapes.get(node.input[1 - slot])
            if const is None or other is None or len(other) != 4:
                continue
            c, h, w = other[1:]
            if const.squeeze().shape != (c,) or const.ndim not in (3, 4) or not 1 < h * w <= max_positions:
                continue
            expanded = np.ascontiguousarray(np.broadcast_to(const.reshape(c, 1, 1), (c, h, w)))
            node.input[slot] = g.add_initializer(expanded, name)
    return g.finish()


def expand_embedding_adds(model: bytes, shapes: Shapes, max_positions: int = 16) -> bytes:
    """The per-item, per-channel operand (N,C,1,1) of an Add on a map of at most
    `max_positions` pixels (each ResBlock adds its timestep embedding) is expanded to the map's
    size by a MatMul with a row of ones, (N,C,1,1) x (1,H*W), before the Add. Each product is
    x * 1.0 with one term (exact), so the sums are the same numbers. onnxruntime broadcasts
    with a loop over every (item, channel): on 256 x 80 x 2 x 2 that Add took 131 us, the
    MatMul and a plain Add 30 us; on 4x4 maps 147 against 68 us; on 8x8 maps the broadcast
    is the faster (128 against 203 us on 256 x 40 x 8 x 8), hence the 16-pixel bound."""
    g = _Graph(onnx.load_from_string(model))
    for node in [n for n in g.graph.node if n.op_type == "Add"]:
        for slot, name in enumerate(node.input):
            small, other = shapes.get(name), shapes.get(node.input[1 - slot])
            if name in g.init or small is None or other is None or len(small) != 4 or len(other) != 4:
                continue
            c, h, w = other[1:]
            if small[1:] != (c, 1, 1) or not 1 < h * w <= max_positions:
                continue
            stem = node.name.strip("/").replace("/", "_")
            ones = g.add_initializer(np.ones((1, h * w), np.float32), f"{stem}_ones")
            shape = g.add_initializer(np.array([-1, c, h, w], np.int64), f"{stem}_shape")
            rows, full = g.fresh(f"{stem}_rows"), g.fresh(f"{stem}_full")
            g.graph.node.extend([helper.make_node("MatMul", [name, ones], [rows]),
                                 helper.make_node("Reshape", [rows, shape], [full])])
            node.input[slot] = full
    return g.finish()


def _dense_conv_matrix(w: np.ndarray, in_hw: tuple[int, int], out_hw: tuple[int, int],
                       strides: list[int], pads: list[int]) -> np.ndarray:
    """The (co*OH*OW, ci*H*W) matrix of a convolution on a fixed small map: row
    (co, oy, ox), column (ci, iy, ix). Taps that fall on padding have no column (they
    multiply zeros); no two taps share a column, so every entry is one weight or zero."""
    co, ci, kh, kw = w.shape
    (h, wd), (oh, ow) = in_hw, out_hw
    dense = np.zeros((co, oh, ow, ci, h, wd), w.dtype)
    for oy in range(oh):
        for ox in range(ow):
            for ky in range(kh):
                for kx in range(kw):
                    iy, ix = oy * strides[0] - pads[0] + ky, ox * strides[1] - pads[1] + kx
                    if 0 <= iy < h and 0 <= ix < wd:
                        dense[:, oy, ox, :, iy, ix] = w[:, :, ky, kx]
    return dense.reshape(co * oh * ow, ci * h * wd)


def kernel_from_dense(dense: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `_dense_conv_matrix`, so that teacher.py can rebuild a torch net from a
    rewritten graph: the (co*OH*OW, ci*H*W) matrix of a convolution on a small map back to its
    (co, ci, kh, kw) kernel (square maps, padding kh // 2, as the UNet's convs are).
    A tap that lands on the map at no output position (the first row of a stride-2 kernel on a
    2x2 map) only ever multiplies padding at this map size: it comes back as 0, and the rebuilt
    net computes the same function on blocks of this size."""
    co, ci, kh, kw = shape
    oh, h = math.isqrt(dense.shape[0] // co), math.isqrt(dense.shape[1] // ci)
    stride, pad = max(1, h // oh), kh // 2
    d = dense.reshape(co, oh, oh, ci, h, h)
    w = np.zeros(shape, dense.dtype)
    for ky in range(kh):
        for kx in range(kw):
            spots = [(oy, ox) for oy in range(oh) for ox in range(oh)
                     if 0 <= oy * stride - pad + ky < h and 0 <= ox * stride - pad + kx < h]
            if spots:
                oy, ox = spots[0]
                w[:, :, ky, kx] = d[:, oy, ox, :, oy * stride - pad + ky, ox * stride - pad + kx]
    return w


def convs_as_gemm(model: bytes, shapes: Shapes) -> bytes:
    """Quantized convolutions whose input map has no more pixels than their kernel has taps
    become one int8 GEMM over the whole flattened map: onnxruntime fuses DQ -> Gemm -> Q into
    QGemm. The GEMM then does no more multiply-accumulates than the convolution, usually
    fewer (a 3x3 kernel on a 2x2 map; measured: a 1x1 kernel on a 2x2 map, 4x the MACs as a
    GEMM, is slower that way).

    On a 2x2 map a 3x3 convolution multiplies zero padding in 56% of its MACs; the GEMM has
    only the taps that land on the map. The integer sums are the same (int8 x uint8 into
    int32, exact in any order) and the bias and requantisation scales are the convolution's,
    repeated over positions, so the quantized outputs are the same."""
    g = _Graph(onnx.load_from_string(model))
    for conv in [n for n in g.graph.node if n.op_type == "Conv"]:
        x_dq, w_dq = g.producer.get(conv.input[0]), g.producer.get(conv.input[1])
        b_dq = g.producer.get(conv.input[2]) if len(conv.input) > 2 else None
        users = g.consumers.get(conv.output[0], [])
        if not (x_dq and w_dq and b_dq and all(n.op_type == "DequantizeLinear" for n in (x_dq, w_dq, b_dq))):
            continue
        if len(users) != 1 or users[0].op_type != "QuantizeLinear" or _attr(conv, "group", 1) != 1:
            continue
        if any(d != 1 for d in _attr(conv, "dilations", [1, 1])):
            continue
        _, ci, h, wd = shapes[conv.input[0]]
        _, co, oh, ow = shapes[conv.output[0]]
        w = g.array(w_dq.input[0])
        if w is None or h * wd > w.shape[2] * w.shape[3]:
            continue
        w_scale, w_zp = g.array(w_dq.input[1]), g.array(w_dq.input[2])
        b, b_scale, b_zp = (g.array(name) for name in b_dq.input[:3])
        if any(a is None for a in (w, w_scale, w_zp, b, b_scale, b_zp)) or w_scale.ndim != 1:
            continue
        q = users[0]
        positions = oh * ow
        dense = _dense_conv_matrix(w, (h, wd), (oh, ow), _attr(conv, "strides", [1, 1]),
                                   _attr(conv, "pads", [0, 0, 0, 0]))
        stem = conv.name.strip("/").replace("/", "_")
        flat_in = g.fresh(f"{stem}_in")
        x_flat = g.fresh(f"{stem}_in_dq")
        weight, bias = g.fresh(f"{stem}_w"), g.fresh(f"{stem}_b")
        y, y_q = g.fresh(f"{stem}_y"), g.fresh(f"{stem}_yq")
        in_shape = g.add_initializer(np.array([-1, ci * h * wd], np.int64), f"{stem}_shape_in")
        out_shape = g.add_initializer(np.array([-1, co, oh, ow], np.int64), f"{stem}_shape_out")

        def rep(a: np.ndarray, hint: str) -> str:
            return g.add_initializer(np.repeat(a, positions), f"{stem}_{hint}")
        new = [
            helper.make_node("Reshape", [x_dq.input[0], in_shape], [flat_in]),
            helper.make_node("DequantizeLinear", [flat_in, *x_dq.input[1:]], [x_flat]),
            helper.make_node("DequantizeLinear", [g.add_initializer(dense, f"{stem}_wq"), rep(w_scale, "ws"),
                                                  rep(w_zp, "wz")], [weight], axis=0),
            helper.make_node("DequantizeLinear", [rep(b, "bq"), rep(b_scale, "bs"), rep(b_zp, "bz")], [bias], axis=0),
            helper.make_node("Gemm", [x_flat, weight, bias], [y], name=f"{conv.name}_as_gemm", transB=1),
            helper.make_node("QuantizeLinear", [y, *q.input[1:]], [y_q]),
            helper.make_node("Reshape", [y_q, out_shape], [q.output[0]]),
        ]
        g.graph.node.extend(new)
        g.graph.node.remove(conv)
        g.graph.node.remove(q)
    return g.finish()


def static_reshapes(model: bytes, shapes: Shapes) -> bytes:
    """Reshapes whose target shape is computed at run time from the shapes of values (the
    GroupNorm export reads it with a Shape node; the decoder's codebook lookup builds it with
    Shape, Gather, Unsqueeze and Concat) get it as a constant, batch entry -1, and the kernels
    that computed it go: 0.95-0.99x the denoiser call, 0.94x the fashion decoder's (a few
    microseconds per kernel, which matter most on small calls).
    The target is read at batches 1, 2 and 3: an entry that stays put is a constant, the one
    entry that grows with the batch becomes -1; a target with any other entry is left alone.
    Only for graphs whose inputs have no free axis but the batch (`shapes` is not needed)."""
    proto = onnx.load_from_string(model)
    initializers = {i.name for i in proto.graph.initializer}
    for value in proto.graph.input:
        if value.name not in initializers and any(d.dim_value <= 0 for d in value.type.tensor_type.shape.dim[1:]):
            return model
    g = _Graph(proto)
    reshapes = [n for n in g.graph.node if n.op_type == "Reshape" and n.input[1] not in g.init]
    if not reshapes:
        return model
    runs = [_all_values(model, batch)[1] for batch in (1, 2, 3)]
    for node in reshapes:
        one, two, three = (run[node.input[1]] for run in runs)
        grows = one != two
        if grows.sum() > 1 or (grows.any() and (-1 in one or two[grows] != 2 * one[grows]
                                                or three[grows] != 3 * one[grows])):
            continue
        target = np.where(grows, -1, one).astype(np.int64)
        node.input[1] = g.add_initializer(target, f"{node.name.strip('/').replace('/', '_')}_static")
    return g.finish()


def widen_narrow_convs(model: bytes, shapes: Shapes, narrow: int = 3, width: int = 16) -> bytes:
    """Quantized convolutions with at most `narrow` output channels (the decoder's last conv
    makes 1 or 3, the image's) get zero filters up to `width`, and a Slice of the uint8 output
    keeps the real channels: onnxruntime's int8 convolution is slower at 1-3 output channels
    than at 16 (the fashion decoder's last conv: 46 us against about 30 us for two images;
    the decoder 0.96x). Each real channel sums the same integer products with the same
    bias and scales, so the kept outputs are the same numbers."""
    g = _Graph(onnx.load_from_string(model))
    for conv in [n for n in g.graph.node if n.op_type == "Conv"]:
        w_dq = g.producer.get(conv.input[1])
        b_dq = g.producer.get(conv.input[2]) if len(conv.input) > 2 else None
        users = g.consumers.get(conv.output[0], [])
        if not (w_dq and b_dq and w_dq.op_type == b_dq.op_type == "DequantizeLinear") \
                or len(users) != 1 or users[0].op_type != "QuantizeLinear" or _attr(conv, "group", 1) != 1:
            continue
        dq_arrays = [[g.array(name) for name in dq.input[:3]] for dq in (w_dq, b_dq)]
        if any(a is None for arrays in dq_arrays for a in arrays) or dq_arrays[0][0].shape[0] > narrow:
            continue
        channels = dq_arrays[0][0].shape[0]
        for dq, arrays in zip((w_dq, b_dq), dq_arrays):
            per_channel = arrays[1].ndim == 1
            for slot, a in enumerate(arrays):
                if slot == 0 or per_channel:           # values, and per-channel scales / zero points
                    a = np.broadcast_to(a, (channels,)) if slot > 0 else a   # a scalar zero point beside a (1,) scale
                    fill = a[-1] if slot == 1 else 0  # a scale must not be 0; the filters are
                    padded = np.concatenate([a, np.full((width - channels,) + a.shape[1:], fill, a.dtype)])
                    dq.input[slot] = g.add_initializer(padded, f"{dq.input[slot]}_wide")
            if per_channel:     # a (1,) scale may have been per-tensor (no axis): now it is per output channel
                _set_axis(dq, 0)
        q, stem = users[0], conv.name.strip("/").replace("/", "_")
        wide = g.fresh(f"{stem}_wide")
        kept = [g.add_initializer(np.array([v], np.int64), f"{stem}_{hint}")
                for v, hint in ((0, "start"), (channels, "end"), (1, "axis"))]
        g.graph.node.append(helper.make_node("Slice", [wide, *kept], [q.output[0]]))
        q.output[0] = wide
        stale = {conv.output[0], w_dq.output[0], b_dq.output[0]}       # declared with the old channel count
        for info in [v for v in g.graph.value_info if v.name in stale]:
            g.graph.value_info.remove(info)
    return g.finish()


Rewrite = Callable[[bytes, Shapes], bytes]
REWRITES: dict[str, Rewrite] = {
    "expand-broadcasts": expand_broadcasts,
    "convs-as-gemm": convs_as_gemm,
    "static-reshapes": static_reshapes,
    "expand-embedding-adds": expand_embedding_adds,
    "widen-narrow-convs": widen_narrow_convs,
}
DEFAULT_REWRITES = ("expand-broadcasts", "convs-as-gemm", "static-reshapes", "expand-embedding-adds")
# The decoder's (16x16 and 32x32 maps: the small-map rewrites do not apply; expand-broadcasts
# measured 1.01x its time).
DECODER_REWRITES = ("static-reshapes", "widen-narrow-convs")


def rewrite(model: bytes, names: tuple[str, ...] | list[str] = DEFAULT_REWRITES) -> bytes:
    """Apply the named rewrites in order (shapes are re-read after each). Each is a no-op on
    a graph it has already rewritten."""
    for name in names:
        if name not in REWRITES:
            raise ValueError(f"unknown graph rewrite {name!r}: known are {', '.join(REWRITES)}")
        model = REWRITES[name](model, value_shapes(model))
    return model


def _random_feeds(model: bytes, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Random float inputs (integer inputs, the block positions, stay as `_zero_feeds` sets them: valid)."""
    rng = np.random.default_rng(seed)
    feeds = _zero_feeds(onnx.load_from_string(model), batch)
    return {k: rng.standard_normal(v.shape).astype(v.dtype) if v.dtype.kind == "f" else v
            for k, v in feeds.items()}


def same_outputs(a: bytes, b: bytes, feeds: dict[str, np.ndarray]) -> bool:
    """Whether two models give bit-identical outputs on `feeds` (onnxruntime, one thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    runs = [ort.InferenceSession(m, options, providers=["CPUExecutionProvider"]).run(None, feeds) for m in (a, b)]
    return all(np.array_equal(x, y) for x, y in zip(*runs))


def runs_unoptimised(model: bytes, feeds: dict[str, np.ndarray]) -> bool:
    """Whether onnxruntime runs the graph node by node (no graph optimisation). A rewritten
    graph can be invalid where its fusions hide it: the int8 conv fusion never runs a conv's
    weight and bias DequantizeLinear nodes, so a wrong axis or zero point there only fails here."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(None, feeds)
    except Exception:        # onnxruntime raises its own untyped errors on bad graphs
        return False
    return True


def _exact_rewrites(model: bytes, names: tuple[str, ...] | list[str]) -> tuple[bytes, list[str]]:
    """The model with each named rewrite applied in turn, kept only if the graph stays
    bit-identical to the input on random calls of 1 and 37 items and still runs unoptimised: a
    rewrite that would change one output bit (on some target or onnxruntime version), or leave
    a graph that only onnxruntime's fusions make runnable, is left out, never shipped; and the
    names kept."""
    checks = [_random_feeds(model, batch, seed) for batch, seed in ((1, 0), (37, 1))]
    applied, current = [], model
    for name in names:
        candidate = rewrite(current, [name])
        if all(same_outputs(model, candidate, feeds) for feeds in checks) and runs_unoptimised(candidate, checks[0]):
            applied, current = applied + [name], candidate
    return current, applied


def optimize(model: bytes, names: tuple[str, ...] | list[str] = DEFAULT_REWRITES) -> tuple[bytes, dict]:
    """The rewritten denoiser (`_exact_rewrites`) and the manifest record of what was done."""
    macs = sum(node_macs(model).values())
    current, applied = _exact_rewrites(model, names)
    return current, {"denoiser_rewrites": applied, "denoiser_macs_per_block": macs,
                     "denoiser_executed_macs_per_block": sum(node_macs(current).values())}


def optimize_decoder(model: bytes, names: tuple[str, ...] | list[str] = DECODER_REWRITES) -> tuple[bytes, list[str]]:
    """The rewritten decoder (`_exact_rewrites`) and the rewrites kept, for the manifest's
    `graph.decoder_rewrites`. At 4 steps the decoder is a fifth of an image's time."""
    return _exact_rewrites(model, names)


def rewrite_bundle(source: Path, out: Path, names: tuple[str, ...] | list[str] = DEFAULT_REWRITES,
                   signing_key: bytes | None = None,
                   decoder_names: tuple[str, ...] | list[str] = DECODER_REWRITES) -> dict:
    """Re-pack a bundle with its denoiser and decoder rewritten: no training run needed, every
    other member and manifest field kept; the manifest's `graph` records the rewrites. Returns
    the manifest."""
    bundle = Bundle.open(source)
    manifest, members = pack.contents(bundle)
    previous = bundle.manifest.get("graph", {})
    members["denoiser.onnx"], record = optimize(members["denoiser.onnx"], names)
    members["decoder.onnx"], decoder_applied = optimize_decoder(members["decoder.onnx"], decoder_names)
    if previous:       # a second pass: the layer count is the first pass's (the layers are gone)
        record["denoiser_macs_per_block"] = previous["denoiser_macs_per_block"]
        record["denoiser_rewrites"] = list(dict.fromkeys(previous["denoiser_rewrites"] + record["denoiser_rewrites"]))
    record["decoder_rewrites"] = list(dict.fromkeys(previous.get("decoder_rewrites", []) + decoder_applied))
    manifest["graph"] = record
    pack.write(Path(out), manifest, members, signing_key)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """`python -m rissole_export.graph BUNDLE -o OUT`: rewrite a bundle's denoiser and decoder
    (OUT may be BUNDLE itself: the new file replaces it atomically, only once it is complete)."""
    import argparse
    import sys

    from rissole_edge.errors import RissoleError
    parser = argparse.ArgumentParser(prog="python -m rissole_export.graph",
                                     description="Re-pack a bundle with its denoiser and decoder graphs rewritten for the CPU "
                                                 "(bit-identical outputs).")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--rewrites", default=",".join(DEFAULT_REWRITES),
                        help=f"the denoiser's, comma-separated, in order (default: {','.join(DEFAULT_REWRITES)}; "
                             f"known: {','.join(REWRITES)})")
    parser.add_argument("--decoder-rewrites", default=",".join(DECODER_REWRITES),
                        help=f"the decoder's, likewise (default: {','.join(DECODER_REWRITES)})")
    args = parser.parse_args(argv)
    names = [n for n in args.rewrites.split(",") if n]
    decoder_names = [n for n in args.decoder_rewrites.split(",") if n]
    unknown = [n for n in names + decoder_names if n not in REWRITES]
    try:
        if unknown:
            raise RissoleError(f"unknown rewrite {unknown[0]!r}: known are {', '.join(REWRITES)}")
        if not args.out.parent.is_dir():
            raise RissoleError(f"cannot write {args.out}: folder {args.out.parent} does not exist")
        manifest = rewrite_bundle(args.bundle, args.out, names, decoder_names=decoder_names)
    except (RissoleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    g = manifest["graph"]
    print(f"wrote {args.out}: rewrites {', '.join(g['denoiser_rewrites'])}; "
          f"{g['denoiser_macs_per_block'] / 1e6:.2f} M MACs per block as layered, "
          f"{g['denoiser_executed_macs_per_block'] / 1e6:.2f} M executed; "
          f"decoder rewrites {', '.join(g['decoder_rewrites']) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
