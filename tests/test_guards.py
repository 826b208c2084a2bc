"""Targeted refusals of crafted bundle members that pass every checksum: ONNX models that
reference external data (onnx_guard) and HNSW indexes whose ids point outside (index_guard)."""

import struct
from pathlib import Path

import hnswlib
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rissole_edge.bundle import Bundle, BundleError
from rissole_edge.generator import Generator
from rissole_edge.index_guard import check_index
from rissole_edge.onnx_guard import check_self_contained
from rissole_export import pack
from rissole_export.database import index_bytes
from rissole_export.rebuild import build_db

from conftest import SAMPLE, cli

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "fashion-mnist.rissole"


def _external(tensor: onnx.TensorProto, how: str = "both") -> None:
    """Turn a tensor into a reference to a file, as onnx's external-data format writes it."""
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    if how in ("both", "location"):
        tensor.data_location = TensorProto.EXTERNAL
    if how in ("both", "entries"):
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", "../../../etc/passwd"


def _weights() -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones((1, 2), np.float32), "w")


def _model(where: str, how: str = "both") -> bytes:
    """Y = X + w with the tensor w in `where`; with how="none" the model is self-contained."""
    w = _weights()
    if how != "none":
        _external(w, how)
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2])
    initializers, sparse, functions, opsets = [], [], [], [helper.make_opsetid("", 17)]
    if where == "initializer":
        nodes = [helper.make_node("Add", ["X", "w"], ["Y"])]
        initializers = [w]
    elif where == "constant":
        nodes = [helper.make_node("Constant", [], ["w"], value=w), helper.make_node("Add", ["X", "w"], ["Y"])]
    elif where == "sparse":
        values = numpy_helper.from_array(np.ones(2, np.float32), "w")
        if how != "none":
            _external(values, how)
        indices = numpy_helper.from_array(np.array([0, 1], np.int64), "w_indices")
        sparse = [helper.make_sparse_tensor(values, indices, [1, 2])]
        nodes = [helper.make_node("Add", ["X", "w"], ["Y"])]
    elif where == "subgraph":
        branch = helper.make_graph([helper.make_node("Identity", ["w"], ["wb"])], "branch", [],
                                   [helper.make_tensor_value_info("wb", TensorProto.FLOAT, [1, 2])], [w])
        cond = numpy_helper.from_array(np.array(True), "cond")
        nodes = [helper.make_node("Constant", [], ["c"], value=cond),
                 helper.make_node("If", ["c"], ["w"], then_branch=branch, else_branch=branch),
                 helper.make_node("Add", ["X", "w"], ["Y"])]
    elif where == "function":
        body = [helper.make_node("Constant", [], ["w"], value=w), helper.make_node("Add", ["a", "w"], ["b"])]
        functions = [helper.make_function("local", "AddW", ["a"], ["b"], body, [helper.make_opsetid("", 17)])]
        opsets.append(helper.make_opsetid("local", 1))
        nodes = [helper.make_node("AddW", ["X"], ["Y"], domain="local")]
    else:
        raise ValueError(where)
    graph = helper.make_graph(nodes, "g", [x], [y], initializers, sparse_initializer=sparse)
    return helper.make_model(graph, opset_imports=opsets, functions=functions).SerializeToString()


@pytest.mark.parametrize("where", ["initializer", "constant", "sparse", "subgraph", "function"])
def test_onnx_external_data_is_refused_wherever_a_tensor_lives(where):
    check_self_contained(_model(where, "none"), "model")              # the same model, inline: accepted
    for how in ("both", "location", "entries"):
        with pytest.raises(BundleError, match="references external data"):
            check_self_contained(_model(where, how), "model")


def _repacked(tmp_path: Path, replace: dict[str, bytes]) -> Path:
    """The shipped bundle with members replaced, every checksum valid."""
    source = Bundle.open(SHIPPED)
    manifest = {k: v for k, v in source.manifest.items() if k not in ("members", "format_version")}
    out = tmp_path / "crafted.rissole"
    pack.write(out, manifest, {name: replace.get(name, source.read(name))
                               for name in source.members})
    return out


def test_a_bundle_whose_denoiser_references_external_data_does_not_open(tmp_path):
    model = onnx.load_from_string(Bundle.open(SHIPPED).read("denoiser.onnx"))
    _external(model.graph.initializer[0])
    crafted = _repacked(tmp_path, {"denoiser.onnx": model.SerializeToString()})
    with pytest.raises(BundleError, match="denoiser references external data"):
        Generator.open(crafted)


def test_build_db_refuses_an_encoder_that_references_external_data(tmp_path):
    """build-db runs the bundle's encoder on new images: through the runtime's checked session."""
    model = onnx.load_from_string(Bundle.open(SHIPPED).read("encoder.onnx"))
    _external(model.graph.initializer[0])
    crafted = _repacked(tmp_path, {"encoder.onnx": model.SerializeToString()})
    with pytest.raises(BundleError, match="encoder references external data"):
        build_db(crafted, SAMPLE, tmp_path / "rebuilt.rissole", log=lambda _: None)
    assert not (tmp_path / "rebuilt.rissole").exists()


# ----------------------------------------------------------------------------- HNSW index

HEADER = struct.Struct("<QQQQQQiIQQQdQ")


def _index(count: int = 300, dim: int = 8) -> bytes:
    keys = np.random.default_rng(0).standard_normal((count, dim)).astype(np.float32)
    index = hnswlib.Index(space="ip", dim=dim)
    index.init_index(max_elements=count, M=4, ef_construction=40, random_seed=0)
    index.add_items(keys, np.arange(count), num_threads=1)
    return index_bytes(index)


def _layout(data: bytes) -> dict:
    f = HEADER.unpack_from(data)
    return {"count": f[2], "per_element": f[3], "label_offset": f[4], "max_m": f[8], "max_m0": f[9],
            "level0_end": HEADER.size + f[2] * f[3]}


def _set_u32(data: bytes, offset: int, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into("<I", out, offset, value)
    return bytes(out)


def _first_upper_link(data: bytes) -> int:
    """Byte offset of the first neighbour id in an upper-level link list."""
    lay = _layout(data)
    pos = lay["level0_end"]
    for _ in range(lay["count"]):
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        for level in range(0, size, lay["max_m"] * 4 + 4):
            if struct.unpack_from("<I", data, pos + level)[0] & 0xFFFF:
                return pos + level + 4
        pos += size
    raise AssertionError("no upper-level links in this index")


def test_index_ids_outside_the_index_are_refused():
    data = _index()
    lay = _layout(data)
    count = lay["count"]
    check_index(data, count, 8)                                         # the untouched index passes
    first_link = HEADER.size + 4                                        # element 0, level 0, neighbour 0
    assert struct.unpack_from("<H", data, HEADER.size)[0] > 0          # element 0 has neighbours
    crafted = {
        "level-0 neighbour list points outside": _set_u32(data, first_link, count),
        "upper-level neighbour list points outside": _set_u32(data, _first_upper_link(data), count + 7),
        "impossible graph parameters": _set_u32(data, 52, count),      # the entry point
        "labels or vectors are invalid": _set_u32(data, HEADER.size + lay["label_offset"], count),
    }
    for why, bad in crafted.items():
        with pytest.raises(BundleError, match=why):
            check_index(bad, count, 8)
    # Ids that stay inside the index are what hnswlib wrote; one that points just inside passes.
    check_index(_set_u32(data, first_link, count - 1), count, 8)


def test_a_bundle_whose_index_points_outside_is_refused_before_hnswlib_loads_it(tmp_path):
    """The index loads on first use (a query by image, or verify): there the guard refuses it."""
    data = Bundle.open(SHIPPED).read("index.bin")
    count = _layout(data)["count"]
    crafted = _repacked(tmp_path, {"index.bin": _set_u32(data, HEADER.size + 4, count + 1)})
    with Generator.open(crafted) as gen, pytest.raises(BundleError, match="points outside the index"):
        gen.db.load_index()
    proc = cli("verify", str(crafted))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "points outside the index" in proc.stderr
