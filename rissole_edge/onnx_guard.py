"""Refuse ONNX models that reference external data.

onnxruntime resolves an initializer's external-data location against the file system, so a
crafted model could make it read any file. Bundle models must carry all their weights inline.
This walks the protobuf wire format directly (the runtime does not depend on the onnx package)
through every place a tensor can live: graph initializers, sparse initializers, node
attributes, subgraphs and functions.
"""

from __future__ import annotations

from .bundle import BundleError

# message kind -> {field number: message kind of that (length-delimited) field}
_MODEL, _GRAPH, _NODE, _ATTR, _FUNC, _SPARSE, _TENSOR = range(7)
_SCHEMA = {
    _MODEL: {7: _GRAPH, 25: _FUNC},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _FUNC: {7: _NODE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {},
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 13, 14, 1
MAX_DEPTH = 64


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _walk(buf: bytes, start: int, end: int, kind: int, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("nesting too deep")
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            if kind == _TENSOR and field == _TENSOR_DATA_LOCATION and value == _EXTERNAL:
                raise LookupError
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("field runs past its message")
            if kind == _TENSOR and field == _TENSOR_EXTERNAL_DATA:
                raise LookupError
            child = _SCHEMA[kind].get(field)
            if child is not None:
                _walk(buf, pos, pos + length, child, depth + 1)
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("message truncated")


def check_self_contained(model: bytes, name: str) -> None:
    """Raise BundleError if `model` is not parseable or references external data."""
    try:
        _walk(model, 0, len(model), _MODEL, 0)
    except LookupError:
        raise BundleError(f"the bundle's {name} references external data, which bundles may not do") from None
    except ValueError as e:
        raise BundleError(f"the bundle's {name} is not a valid ONNX model ({e})") from None
