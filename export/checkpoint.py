"""Checkpoints as single safetensors files, written atomically.

One file per stage holds the weights of every module (e.g. "model/", "ema/", "disc/") and the
optimizer states, so a checkpoint can never be half-new; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


def save(path: Path, step: int, modules: dict[str, nn.Module],
         optimizers: dict[str, torch.optim.Optimizer]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
    groups = {}
    for name, opt in optimizers.items():
        state = opt.state_dict()
        groups[name] = state["param_groups"]
        for pid, entries in state["state"].items():
            for key, value in entries.items():
                tensors[f"{name}/{pid}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "param_groups": json.dumps(groups)})
    os.replace(tmp, path)


def step_of(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["step"])


def load_weights(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The state dict stored under `prefix` (e.g. "ema"), for export or evaluation."""
    with safe_open(str(path), "pt") as f:
        return {key[len(prefix) + 1:]: f.get_tensor(key) for key in f.keys() if key.startswith(prefix + "/")}


def restore(path: Path, modules: dict[str, nn.Module],
            optimizers: dict[str, torch.optim.Optimizer]) -> int:
    """Load everything `save` wrote into the given objects; returns the step to resume from."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    for name, module in modules.items():
        module.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + "/")})
    groups = json.loads(meta["param_groups"])
    for name, opt in optimizers.items():
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            parts = key.split("/")
            if parts[0] == name and len(parts) == 3:
                state.setdefault(int(parts[1]), {})[parts[2]] = value
        opt.load_state_dict({"state": state, "param_groups": groups[name]})
    return int(meta["step"])
