"""torch -> ONNX for the three networks a bundle carries, with a dynamic batch axis.

Names fixed here are the runtime's contract:
  denoiser: x (N,C,s,s) f32, t (N,) f32, pos (N,) i64, [cond (N,k*C,s,s) f32],
            [window (N,C,s+2w,s+2w) f32, when border-conditioned (manifest denoiser.border = w)] -> eps
            With attention across blocks (manifest denoiser.cross_block) N is a multiple of P
            and the rows are whole images, blocks in position order; the graph's metadata
            `ROWS_PER_ITEM` says how many rows make one item (P), for graph.py's counts.
  decoder:  latent (N,C,H,W) f32, scaled as the denoiser sees it -> image (N,c,S,S) in [-1, 1]
  encoder:  image (N,c,S,S) in [-1, 1] -> latent (N,C,H,W) snapped to codes (unscaled), codes (N,H,W) i64
"""

from __future__ import annotations

import io
import warnings

import onnx
import torch
from torch import nn

from rissole_edge.bundle import ROWS_PER_ITEM

from .autoencoder import VQAutoencoder
from .denoiser import UNet

OPSET = 17


class _Denoiser(nn.Module):
    """The UNet with its graph inputs in order, `names` saying which of cond and window there are."""

    def __init__(self, net: UNet, names: list[str]):
        super().__init__()
        self.net, self.names = net, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.names, inputs))
        return self.net(named["x"], named["t"], named["pos"], named.get("cond"), named.get("window"))


class _Decoder(nn.Module):
    def __init__(self, ae: VQAutoencoder, scale: float):
        super().__init__()
        self.ae, self.scale = ae, scale

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.ae.decode_latent(latent / self.scale).clamp(-1.0, 1.0)


class _Encoder(nn.Module):
    def __init__(self, ae: VQAutoencoder):
        super().__init__()
        self.ae = ae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ae.encode(image)


def _export(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], rows_per_item: int = 1) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # the TorchScript exporter's deprecation notice
        torch.onnx.export(module.eval(), args, buf, dynamo=False, opset_version=OPSET,
                          input_names=inputs, output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in inputs + outputs})
    model = onnx.load_from_string(buf.getvalue())
    if rows_per_item > 1:
        onnx.helper.set_model_props(model, {ROWS_PER_ITEM: str(rows_per_item)})
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def denoiser(net: UNet) -> bytes:
    """Traced on two items: two blocks, or two whole images when the blocks attend to each other."""
    c, s, w = net.latent_channels, net.block_size, net.block_size + 2 * net.border
    rows = net.positions if net.mixer is not None else 1
    pos = torch.tensor([0, net.positions - 1]) if rows == 1 else torch.arange(rows).repeat(2)
    n = len(pos)
    args = (torch.randn(n, c, s, s), torch.linspace(10.0, 500.0, n), pos)
    inputs = ["x", "t", "pos"]
    if net.k:
        args += (torch.randn(n, net.k * c, s, s),)
        inputs.append("cond")
    if net.border:
        args += (torch.randn(n, net.border_in.in_channels, w, w),)     # 2C with self-conditioning
        inputs.append("window")
    return _export(_Denoiser(net, inputs), args, inputs, ["eps"], rows)


def decoder(ae: VQAutoencoder, scale: float, latent_side: int) -> bytes:
    z = torch.randn(2, ae.cfg.latent_channels, latent_side, latent_side) * scale
    return _export(_Decoder(ae, scale), (z,), ["latent"], ["image"])


def encoder(ae: VQAutoencoder, channels: int, size: int) -> bytes:
    return _export(_Encoder(ae), (torch.rand(2, channels, size, size) * 2 - 1,), ["image"], ["latent", "codes"])

