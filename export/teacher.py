"""The teacher of a distillation: a denoiser with the latents and neighbour lists it learned on.

From a training run it is the run's EMA denoiser. The shipped bundles' runs are not kept, so
a teacher can also be rebuilt from a bundle: the torch UNet from `denoiser.onnx` (int8 QDQ
weights dequantized, fp32 initializers as they are, ONNX names mapped back to the state dict,
the window conv `border_in` of a border-conditioned bundle too, and checked against the
recipe's config), the latents from the bundle's codebook and codes,
and each image's neighbours from the bundle's own HNSW index, as training drew them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from rissole_edge.bundle import Bundle, Spec
from rissole_edge.errors import DataError
from rissole_edge.retrieval import Database

from . import config, database, denoiser, onnx_export
from .graph import kernel_from_dense
from .sampling import RunModels


@dataclass
class Teacher:
    cfg: config.RunConfig         # the config the denoiser was trained with
    net: denoiser.UNet            # eval mode, epsilon prediction
    latents: torch.Tensor         # (N, P, C, s, s) scaled latent blocks of the training images
    neighbours: np.ndarray        # (N, window) neighbour ids, nearest first, never the image itself
    guidance: float               # the guidance scale its samples are made with
    model: bytes                  # its ONNX graph: the targets are computed with onnxruntime, ~6x torch eager


def from_run(run: Path, guidance: float) -> Teacher:
    m = RunModels.load(run)
    return Teacher(m.cfg, m.net, m.latents, np.asarray(m.db.neighbours), guidance, onnx_export.denoiser(m.net))


def _module_path(scope: str) -> str:
    """'/net/out/out.0/Mul' -> 'out.0'; '/net/down.0/norm1/Add' -> 'down.0.norm1'. The exporter
    names a node by the scopes of the modules that ran it; a child of a Sequential repeats its
    parent's name ('out', 'out.0')."""
    parts: list[str] = []
    for seg in scope.strip("/").split("/")[1:-1]:       # drop the wrapper ('net') and the op
        if parts and seg.startswith(parts[-1] + "."):
            parts[-1] = seg
        else:
            parts.append(seg)
    return ".".join(parts)


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray:
    if scale.ndim == 0:
        return (q.astype(np.float32) - zero.astype(np.float32)) * scale
    shape = [1] * q.ndim
    shape[axis] = -1
    return (q.astype(np.float32) - zero.astype(np.float32).reshape(shape)) * scale.reshape(shape)


def onnx_weights(model: bytes, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """State-dict-named fp32 weights of an exported denoiser: fp32 or int8 QDQ (weights
    dequantized), before or after the rewrites of graph.py. `shapes` are the state dict's."""
    graph = onnx.load_from_string(model).graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:       # constant DequantizeLinear nodes: the int8 weights and biases
        if node.op_type == "DequantizeLinear" and all(i in values for i in node.input):
            q = values[node.input[0]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) if q.ndim > 1 else 0
            values[node.output[0]] = _dequantize(q, values[node.input[1]], values[node.input[2]], axis)
    quant = ("_quantized", "_scale", "_zero_point")
    out = {k[4:]: v for k, v in values.items() if k.startswith("net.") and not k.endswith(quant) and k[4:] in shapes}
    for node in graph.node:
        if not node.name.startswith("/net/"):
            continue
        path = _module_path(node.name)
        if node.op_type == "Conv":
            out[f"{path}.weight"], out[f"{path}.bias"] = values[node.input[1]], values[node.input[2]]
        elif node.op_type == "Gemm" and node.name.endswith("/Conv_as_gemm"):
            weight_shape = shapes[f"{path}.weight"]
            out[f"{path}.weight"] = kernel_from_dense(values[node.input[1]], weight_shape)
            out[f"{path}.bias"] = values[node.input[2]][::len(values[node.input[2]]) // weight_shape[0]]
        elif node.op_type in ("Mul", "Add"):
            consts = [i for i in node.input if i in values and not i.startswith("net.")]
            if len(consts) == 1 and values[consts[0]].ndim == 3:   # a GroupNorm's affine, (C, 1, 1) or expanded (C, H, W)
                out[f"{path}.{'weight' if node.op_type == 'Mul' else 'bias'}"] = values[consts[0]][:, 0, 0]
    return out


def load_onnx_denoiser(model: bytes, cfg: config.RunConfig, spec: Spec) -> denoiser.UNet:
    """The torch UNet of `cfg` holding the weights of an exported denoiser; refused in one line
    if the config's architecture does not match the bundle's."""
    net = denoiser.build(cfg.denoiser, spec.latent_channels, spec.latent_side)
    expected = net.state_dict()
    weights = onnx_weights(model, {k: tuple(v.shape) for k, v in expected.items()})
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = [k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        first = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else
                 f"{wrong[0]} is {tuple(weights[wrong[0]].shape)}, the config makes {tuple(expected[wrong[0]].shape)}")
        raise DataError(f"the bundle's denoiser does not match the config ({first}): "
                        "pass the --preset/--config it was trained with")
    net.load_state_dict({k: torch.from_numpy(np.array(weights[k], dtype=np.float32)) for k in expected})
    return net.eval()


def from_bundle(path: Path, cfg: config.RunConfig) -> Teacher:
    """A teacher rebuilt from a bundle and the config of the run that made it."""
    bundle = Bundle.open(path)
    spec = Spec.from_manifest(bundle.manifest)
    m = bundle.manifest
    checks = [("denoiser.kind", m.get("denoiser", {}).get("kind"), cfg.denoiser.kind),
              ("denoiser.fusion", m.get("denoiser", {}).get("fusion"), cfg.denoiser.fusion),
              ("denoiser.k", spec.k, cfg.denoiser.k if cfg.denoiser.kind == "block" else 0),
              ("denoiser.blocks_per_side", spec.blocks_per_side,
               cfg.denoiser.blocks_per_side if cfg.denoiser.kind != "whole" else 1),
              ("denoiser.schedule", spec.schedule, cfg.denoiser.schedule),
              ("denoiser.timesteps", spec.timesteps, cfg.denoiser.timesteps),
              ("denoiser.border", spec.border, cfg.denoiser.border),
              ("database.window", spec.window, cfg.database.window if spec.k else 0)]
    for name, got, want in checks:
        if got != want:
            raise DataError(f"{path} has {name} = {got!r}, the config says {want!r}: "
                            "pass the --preset/--config it was trained with")
    if m.get("sampling", {}).get("distilled_steps"):
        raise DataError(f"{path} is already distilled: distil its teacher instead")
    if spec.cross_block:      # onnx_weights has no map back from the traced attention's MatMuls
        raise DataError(f"{path} has attention across blocks, whose teacher cannot be rebuilt from a bundle yet: "
                        "distil its training run instead (rissole-edge distill RUN)")
    net = load_onnx_denoiser(bundle.read("denoiser.onnx"), cfg, spec)
    db = Database(bundle, spec)
    latents = torch.from_numpy(db.blocks(np.arange(spec.images)).copy())
    neighbours = np.zeros((spec.images, 0), np.int32)
    if spec.k:
        index = db.index
        keys = np.asarray(index.get_items(np.arange(spec.images)), dtype=np.float32)
        neighbours = database.neighbour_lists(index, keys, database.duplicate_groups(db.codes), spec.window,
                                              torch.get_num_threads())
    return Teacher(cfg, net, latents, neighbours, spec.guidance, bundle.read("denoiser.onnx"))
