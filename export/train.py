"""`rissole-edge train`: the three stages (autoencoder -> database -> denoiser) of a run.

A run directory holds everything: config.json (resolved), one safetensors checkpoint per
trained stage (weights, EMA, optimizer), database/, metrics.jsonl and samples/*.png. Every
stage checkpoints as it goes and resumes from its checkpoint, so a killed run loses at most
`checkpoint_every` steps. Randomness is derived from (seed, stage, step, rank), which makes a
resumed run draw the same batches as an uninterrupted one. Under torchrun it trains with DDP.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from rissole_edge import images as pictures
from rissole_edge.errors import DataError, UsageError
from rissole_edge.progress import Progress

from . import checkpoint, config, data, database, denoiser, estimate
from .autoencoder import PatchDiscriminator, VQAutoencoder
from .diffusion import Diffusion
from .layers import count_parameters
from .pixels import to_pixels, to_tensor
from .sampling import RunModels, block_latents, generate, load_autoencoder

STAGES = ("autoencoder", "database", "denoiser")
LOG_EVERY_S = 30.0          # piped output: one progress line per stage at most this often


class Stopped(Exception):
    """Training stopped early (time limit or signal) after saving a checkpoint."""


@contextlib.contextmanager
def stop_on_signals(ctx: "Context") -> Iterator[None]:
    """SIGINT/SIGTERM set `ctx.signalled`: the step loop then checkpoints and stops (`Stopped`)
    instead of dying mid-write; the previous handlers come back afterwards. A signal the
    process was started ignoring (SIGINT in a script's background job) stays ignored."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) is not signal.SIG_IGN}

    def on_signal(signum: int, frame: object) -> None:
        ctx.signalled = True

    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Context:
    """What every stage needs: the run directory, the config, the device, DDP and the clock."""

    def __init__(self, run: Path, cfg: config.RunConfig, deadline: float | None, progress: bool):
        self.run, self.cfg, self.deadline, self.progress = run, cfg, deadline, progress
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.signalled = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def wrap(self, module: nn.Module) -> nn.Module:
        return DistributedDataParallel(module) if self.world > 1 else module

    def broadcast(self, module: nn.Module) -> None:
        """Make rank 0's parameters and buffers of `module` everyone's (after non-gradient edits)."""
        if self.world > 1:
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, 0)

    def generator(self, stage: str, step: int) -> torch.Generator:
        seed = (self.cfg.seed * 1_000_003 + STAGES.index(stage) * 10_007 + self.rank) * 2_000_003 + step
        return torch.Generator().manual_seed(seed % (2 ** 63))

    def should_stop(self) -> bool:
        stop = self.signalled or (self.deadline is not None and time.monotonic() > self.deadline)
        if self.world > 1:
            flag = torch.tensor(float(stop))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def log(self, stage: str, step: int, **values: float) -> None:
        if self.main:
            record = {"stage": stage, "step": step, "time": round(time.time(), 3), **values}
            with open(self.run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def loop(self, stage: str, start: int, total: int, save: Callable[[int], None]) -> Iterator[int]:
        """Steps start..total-1; checkpoints every `checkpoint_every` and at the end; on a
        time limit or signal it checkpoints and raises `Stopped`."""
        bar = Progress(total, f"{stage} steps", start, enabled=None if self.progress and self.main else False,
                       log_every=LOG_EVERY_S)
        try:
            for step in range(start, total):
                if self.should_stop():
                    save(step)
                    raise Stopped(f"{stage} stopped at step {step}/{total}; checkpoint saved, "
                                  "continue with --resume")
                yield step
                done = step + 1
                bar.update(done)
                if done % self.cfg.checkpoint_every == 0 or done == total:
                    save(done)
        finally:
            bar.close()

    def save(self, name: str, step: int, modules: dict[str, nn.Module],
             optimizers: dict[str, torch.optim.Optimizer]) -> None:
        if self.main:
            checkpoint.save(self.run / f"{name}.safetensors", step, modules, optimizers)
        self.barrier()

    def restore(self, name: str, modules: dict[str, nn.Module],
                optimizers: dict[str, torch.optim.Optimizer]) -> int:
        path = self.run / f"{name}.safetensors"
        return checkpoint.restore(path, modules, optimizers) if path.exists() else 0


def save_grid(images: np.ndarray, path: Path, columns: int = 8) -> None:
    """uint8 (N, H, W, C) -> one PNG grid, tiled and written as `generate` does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures.save_png(pictures.grid([pictures.to_pil(p) for p in images], columns), path)


# ---------------------------------------------------------------- stage 1: autoencoder

@torch.no_grad()
def evaluate_autoencoder(ae: VQAutoencoder, pixels: np.ndarray) -> dict[str, float]:
    """Reconstruction PSNR (dB, on [0, 255]) and the share of codes in use, on `pixels`."""
    ae.eval()
    mse, used = [], set()
    for i in range(0, len(pixels), 512):
        x = to_tensor(pixels[i:i + 512])
        out = ae(x)
        rec = torch.from_numpy(to_pixels(out["recon"])).float()
        mse.append(((rec - torch.from_numpy(pixels[i:i + 512]).float()) ** 2).mean(dim=(1, 2, 3)))
        used.update(out["indices"].unique().tolist())
    ae.train()
    mse_all = torch.cat(mse).mean().item()
    return {"psnr": 10 * math.log10(255 ** 2 / max(mse_all, 1e-10)),
            "codebook_usage": len(used) / ae.cfg.codebook_size}


def learning_rate(cfg: config.AutoencoderConfig | config.DenoiserConfig, step: int) -> float:
    """A stage's learning rate at `step`: constant, or `lr` held and then a cosine down to 0 over
    the last `lr_decay_steps` (the denoiser's; 0 and the autoencoder: over all `steps`). It is a
    function of the step alone, so a resumed run takes the same steps. Decaying it lets the
    last steps settle into a minimum that a constant rate keeps jumping around; holding it
    first lets a constant-rate run be extended and then cooled down (`extended`)."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    decay = getattr(cfg, "lr_decay_steps", 0) or cfg.steps
    start = cfg.steps - decay
    if step < start:
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - start) / decay))


def train_autoencoder(ctx: Context, images: data.ImageSet) -> dict[str, float]:
    cfg = ctx.cfg.autoencoder
    channels = images.train.shape[-1]
    ae = VQAutoencoder(channels, cfg).to(ctx.device)
    disc = PatchDiscriminator(channels).to(ctx.device) if cfg.disc_weight > 0 else None
    opt = torch.optim.Adam(ae.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    modules, optimizers = {"model": ae}, {"optim": opt}
    if disc is not None:
        modules["disc"] = disc
        optimizers["disc_optim"] = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    start = ctx.restore("autoencoder", modules, optimizers)
    model = ctx.wrap(ae)
    critic = ctx.wrap(disc) if disc is not None else None
    train_x = to_tensor(images.train)
    batch = max(1, cfg.batch_size // ctx.world)
    test = images.test if len(images.test) else images.train
    preview = test[:16]

    def save(step: int) -> None:
        ctx.save("autoencoder", step, modules, optimizers)

    for step in ctx.loop("autoencoder", start, cfg.steps, save):
        g = ctx.generator("autoencoder", step)
        x = train_x[torch.randint(len(train_x), (batch,), generator=g)].to(ctx.device)
        out = model(x)
        rec_loss = F.l1_loss(out["recon"], x) + F.mse_loss(out["recon"], x)
        loss = rec_loss + out["codebook_loss"]
        use_disc = critic is not None and step >= cfg.disc_start
        if use_disc:
            loss = loss - cfg.disc_weight * critic(out["recon"]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        opt.step()
        if use_disc:
            d_loss = F.relu(1 - critic(x)).mean() + F.relu(1 + critic(out["recon"].detach())).mean()
            optimizers["disc_optim"].zero_grad(set_to_none=True)
            d_loss.backward()
            optimizers["disc_optim"].step()
        restarted = ae.codebook.restart(out["z"].detach(), out["indices"], g)
        ctx.broadcast(ae.codebook)
        if (step + 1) % ctx.cfg.log_every == 0:
            ctx.log("autoencoder", step + 1, loss=loss.item(), recon=rec_loss.item(),
                    codebook=out["codebook_loss"].item(), restarted=restarted)
        if ctx.main and ((step + 1) % ctx.cfg.sample_every == 0 or step + 1 == cfg.steps):
            with torch.no_grad():
                recon = to_pixels(ae(to_tensor(preview).to(ctx.device))["recon"].cpu())
            save_grid(np.concatenate([preview, recon]), ctx.run / "samples" / f"autoencoder-{step + 1:06d}.png")
    report = evaluate_autoencoder(ae.cpu(), test)
    report["parameters"] = count_parameters(ae)
    if ctx.main:
        ctx.log("autoencoder", cfg.steps, test_psnr=report["psnr"], codebook_usage=report["codebook_usage"])
        (ctx.run / "autoencoder.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# ---------------------------------------------------------------- stage 2: database

def build_database(ctx: Context, images: data.ImageSet) -> dict:
    folder = ctx.run / "database"
    if ctx.main:
        ae = load_autoencoder(ctx.run, ctx.cfg)
        try:
            meta = database.build(ae, images.train, images.train_labels, ctx.cfg.database,
                                  ctx.cfg.denoiser.blocks_per_side, ctx.cfg.denoiser.k, folder,
                                  ctx.cfg.seed, torch.get_num_threads(),
                                  {"name": images.name, "licence": images.licence,
                                   "attribution": images.attribution, "labels": images.class_names})
        except ValueError as e:
            raise DataError(str(e)) from None
        ctx.log("database", 0, recall=meta["recall"], ef=meta["ef"], query_us=meta["query_us"])
    ctx.barrier()
    return json.loads((folder / "meta.json").read_text())


# ---------------------------------------------------------------- stage 3: denoiser

def train_denoiser(ctx: Context) -> dict[str, float]:
    cfg = ctx.cfg.denoiser
    db = database.Database.load(ctx.run / "database")
    ae = load_autoencoder(ctx.run, ctx.cfg)
    latents = block_latents(ae, db, whole=cfg.kind == "whole")                  # (N, P, C, s, s)
    net = denoiser.build(cfg, db.meta["latent_channels"], db.meta["latent_side"])
    diffusion = Diffusion(cfg.schedule, cfg.timesteps)
    preview_ids = np.random.default_rng(ctx.cfg.seed).permutation(len(latents))[:16].tolist()

    def preview(ema: denoiser.UNet, step: int) -> None:
        m = RunModels(ctx.cfg, ae, ema, db, latents, diffusion)
        images = generate(m, preview_ids, seed=ctx.cfg.seed, steps=25)
        save_grid(images, ctx.run / "samples" / f"denoiser-{step:06d}.png")

    fit_denoiser(ctx, net, latents, np.asarray(db.neighbours), preview)
    return {"parameters": count_parameters(net)}


def noisy_batch(diffusion: Diffusion, images: torch.Tensor, pos: torch.Tensor, t: torch.Tensor,
                g: torch.Generator, border: int, blocks_per_side: int,
                estimate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x_t of block `pos`, its noise, its window or None) for latents `images` (batch, P, C, s, s);
    `pos` (batch, m) takes m blocks of each image, flattened image-major.
    With `border` the whole latent of each image is noised at its one timestep, so the strips
    of the adjacent blocks in the window are what sampling gives the block: x_t at the same t.
    `estimate(x_t, t)` (self-conditioning) gives x0 estimates of all blocks (batch, P, C, s, s),
    whose windows follow x_t's in the window's channels."""
    rows = torch.arange(len(images), device=images.device).view(-1, *[1] * (pos.dim() - 1))
    if not border:
        x0 = images[rows, pos]
        noise = torch.randn(x0.shape, generator=g).to(images.device)
        return diffusion.add_noise(x0, t, noise).flatten(0, pos.dim() - 1), noise.flatten(0, pos.dim() - 1), None
    noise = torch.randn(images.shape, generator=g).to(images.device)
    x_t = diffusion.add_noise(images, t, noise)
    seen = x_t if estimate is None else torch.cat([x_t, estimate(x_t, t)], dim=2)
    picked = (x_t[rows, pos], noise[rows, pos], denoiser.windows(seen, blocks_per_side, border)[rows, pos])
    return tuple(x.flatten(0, pos.dim() - 1) for x in picked)


def self_estimates(net: denoiser.UNet, diffusion: Diffusion, cond: torch.Tensor | None, use: torch.Tensor,
                   blocks_per_side: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The `estimate` of `noisy_batch` for a self-conditioned net: the net's own x0 estimate of
    every block of the images where `use` (batch,) is True, from a first call without one
    (no gradient), zeros elsewhere (as at sampling's first call). `cond` (batch, P, k*C, s, s):
    each image's neighbour blocks at every position, as sampling gives all blocks of an image."""
    def estimate(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x_t)
        if not bool(use.any()):
            return out
        xs, ts = x_t[use], t[use]
        m, p = xs.shape[:2]
        window = denoiser.windows(torch.cat([xs, torch.zeros_like(xs)], dim=2), blocks_per_side, net.border)
        pos = torch.arange(p, device=xs.device).repeat(m)
        with torch.no_grad():
            eps = net(xs.flatten(0, 1), ts.repeat_interleave(p).float(), pos,
                      None if cond is None else cond[use].flatten(0, 1), window.flatten(0, 1))
        a = diffusion.alpha_bar.to(xs.device)[ts].view(-1, 1, 1, 1, 1)
        out[use] = denoiser.x0_estimate(xs, eps.view_as(xs), a)
        return out
    return estimate


def image_cond(latents: torch.Tensor, nb: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(batch, P, k*C, s, s): the neighbours `nb` (batch, k) at every block position, dropped
    (zeros) where `keep` (batch,) is 0."""
    blocks = latents[nb]                                                    # (batch, k, P, C, s, s)
    n, k, p, c, s, _ = blocks.shape
    return blocks.permute(0, 2, 1, 3, 4, 5).reshape(n, p, k * c, s, s) * keep.view(-1, 1, 1, 1, 1)


def adjacent_pairs(blocks_per_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """((m, 2) positions of every pair of adjacent blocks, left/upper first; (m,) True where the
    pair is stacked): what the seam loss draws from."""
    b = blocks_per_side
    across = [(r * b + col, r * b + col + 1) for r in range(b) for col in range(b - 1)]
    down = [(r * b + col, (r + 1) * b + col) for r in range(b - 1) for col in range(b)]
    return torch.tensor(across + down, dtype=torch.long), torch.tensor([False] * len(across) + [True] * len(down))


class Batch(NamedTuple):
    """One training step's draw: which block of which image each row denoises, and what it is
    conditioned on. The rows of an image are consecutive (`group` of them)."""
    idx: torch.Tensor                   # (m,) the image of each row
    pos: torch.Tensor                   # (m,) its block position
    group: int                          # rows per image: P (cross_block), 2 (seam loss alone) or 1
    pick: torch.Tensor | None           # seam loss: which adjacent pair each image's two rows are
    nb: torch.Tensor | None             # (m, k) the neighbour images each row is conditioned on
    cond: torch.Tensor | None           # (m, k*C, s, s) their blocks at the row's position (zeros where dropped)
    keep: torch.Tensor | None           # (m,) 0 where the conditioning is dropped


def draw_batch(cfg: config.DenoiserConfig, k: int, latents: torch.Tensor, neighbours: torch.Tensor,
               pairs: torch.Tensor, batch: int, g: torch.Generator) -> Batch:
    """Draw a step's rows from `latents` (N, P, C, s, s) and the neighbour lists (N, window).

    Rows that belong to one image (a cross_block image's P blocks, a seam-loss pair) share one
    draw of k neighbours and one conditioning dropout, because at sampling time the blocks of an
    image share them: a mixer or a seam loss trained on blocks that saw different neighbours
    would learn to reconcile what sampling never asks it to. With both switches the batch holds
    whole images and the seam loss takes every adjacent pair in them (`seam_term`)."""
    device = latents.device
    n, positions, c, s, _ = latents.shape
    group = positions if cfg.cross_block else 2 if cfg.seam_loss else 1
    pick = None
    if cfg.cross_block:     # batch // P images, all their blocks: the mixer attends across them
        idx = torch.randint(n, (batch // group,), generator=g).repeat_interleave(group).to(device)
        pos = torch.arange(positions).repeat(batch // group).to(device)
    elif cfg.seam_loss:     # batch // 2 images, one adjacent pair of blocks each
        idx = torch.randint(n, (batch // 2,), generator=g).repeat_interleave(2).to(device)
        pick = torch.randint(len(pairs), (batch // 2,), generator=g)
        pos = pairs[pick].reshape(-1).to(device)
    else:
        idx = torch.randint(n, (batch,), generator=g).to(device)
        pos = torch.randint(positions, (batch,), generator=g).to(device)
    if not k:
        return Batch(idx, pos, group, pick, None, None, None)
    # k of the `window` nearest, in rank order: the same rule as at sampling time
    m = len(idx)
    ranks = torch.rand(m // group, neighbours.shape[1], generator=g).argsort(1)[:, :k].sort(1).values
    nb = neighbours[idx[:, None], ranks.repeat_interleave(group, 0).to(device)]     # (m, k)
    cond = latents[nb, pos[:, None]].reshape(m, k * c, s, s)
    if cfg.cond_noise:
        cond = cond + cfg.cond_noise * torch.randn(cond.shape, generator=g).to(device)
    keep = (torch.rand(m // group, generator=g) >= cfg.cond_drop).float().repeat_interleave(group).to(device)
    return Batch(idx, pos, group, pick, nb, cond * keep[:, None, None, None], keep)


def seam_term(error: torch.Tensor, group: int, pick: torch.Tensor | None, pairs: torch.Tensor,
              vertical: torch.Tensor) -> torch.Tensor:
    """The seam loss of a batch's epsilon errors (rows grouped by image, as `draw_batch` makes
    them): over each image's drawn pair (group 2), or over every adjacent pair of each whole
    image (group P, position order), each pair weighing the same."""
    if pick is not None:
        return denoiser.seam_loss(error[0::2], error[1::2], vertical[pick])
    images = error.reshape(-1, group, *error.shape[1:])
    first, second = (images[:, pairs[:, j].to(error.device)].flatten(0, 1) for j in (0, 1))
    return denoiser.seam_loss(first, second, vertical.repeat(len(images)).to(error.device))


def fit_denoiser(ctx: Context, net: denoiser.UNet, latents: torch.Tensor, neighbours: np.ndarray,
                 preview: Callable[[denoiser.UNet, int], None] | None = None) -> None:
    """Train `net` (from its current weights) on `latents` (N, P, C, s, s) with the neighbour
    lists `neighbours` (N, window), checkpointing to ctx.run/denoiser.safetensors and resuming
    from it; `preview(ema on the CPU, step)` draws a sample grid every `sample_every` steps."""
    cfg = ctx.cfg.denoiser
    latents = latents.to(ctx.device)
    neighbours = torch.from_numpy(neighbours).long().to(ctx.device)
    net = net.to(ctx.device)
    ema = copy.deepcopy(net).requires_grad_(False)
    ema_params, net_params = list(ema.parameters()), list(net.parameters())
    # fused: one kernel per step on a GPU, where this small model is bound by kernel launches
    opt = torch.optim.Adam(net_params, lr=cfg.lr, fused=ctx.device.type == "cuda")
    modules, optimizers = {"model": net, "ema": ema}, {"optim": opt}
    start = ctx.restore("denoiser", modules, optimizers)
    model = ctx.wrap(net)
    diffusion = Diffusion(cfg.schedule, cfg.timesteps)
    b = int(round(latents.shape[1] ** 0.5))
    batch = max(1, cfg.batch_size // ctx.world)
    pairs, vertical = adjacent_pairs(b)

    def save(step: int) -> None:
        ctx.save("denoiser", step, modules, optimizers)

    for step in ctx.loop("denoiser", start, cfg.steps, save):
        g = ctx.generator("denoiser", step)
        idx, pos, group, pick, nb, cond, keep = draw_batch(cfg, net.k, latents, neighbours, pairs, batch, g)
        first = slice(None, None, group)        # one row per image
        own_estimate = None
        if cfg.self_condition:  # half the images get the net's own estimate, as sampling will
            use = (torch.rand(len(idx[first]), generator=g) < 0.5).to(ctx.device)
            image_nb = None if nb is None else image_cond(latents, nb[first], keep[first])
            own_estimate = self_estimates(net, diffusion, image_nb, use, b)
        if group > 1:           # the blocks of an image from one noisy latent, at one timestep
            t = torch.randint(cfg.timesteps, (batch // group,), generator=g).to(ctx.device)
            x_t, noise, window = noisy_batch(diffusion, latents[idx[first]], pos.view(-1, group), t, g, net.border, b,
                                             own_estimate)
            t = t.repeat_interleave(group)
            error = model(x_t, t.float(), pos, cond, window) - noise
            loss = error.pow(2).mean()
            if cfg.seam_loss:
                loss = loss + cfg.seam_loss * seam_term(error, group, pick, pairs, vertical)
        else:
            t = torch.randint(cfg.timesteps, (batch,), generator=g).to(ctx.device)
            x_t, noise, window = noisy_batch(diffusion, latents[idx], pos, t, g, net.border, b, own_estimate)
            loss = denoiser.epsilon_loss(model, x_t, t.float(), pos, cond, noise, window)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for param_group in opt.param_groups:
            param_group["lr"] = learning_rate(cfg, step)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))     # warm-up: EMA tracks early weights
            torch._foreach_lerp_(ema_params, net_params, 1 - decay)   # one launch, not one per tensor
        if (step + 1) % ctx.cfg.log_every == 0:
            ctx.log("denoiser", step + 1, loss=loss.item())
        if preview is not None and ctx.main and ((step + 1) % ctx.cfg.sample_every == 0 or step + 1 == cfg.steps):
            preview(ema.cpu().eval(), step + 1)
            ema.to(ctx.device)


# ---------------------------------------------------------------- the command

def prepare(source: str, out: Path, preset: str | None, config_file: Path | None,
            resume: bool, size: int | None = None) -> config.RunConfig:
    """Resolve the config (`size`, from --size, overrides data.size), check that the models can
    divide the image size, and check it against what RUN_DIR already holds."""
    stored_path = out / "config.json"
    stored = config.load(stored_path) if stored_path.exists() else None
    if resume and stored is None:
        raise UsageError(f"nothing to resume: {out} holds no run (no config.json)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if stored is None and out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} is not empty and holds no run: choose a new folder")
    overrides = config.read_config_file(config_file) if config_file else {}
    if stored is not None and preset is None and (resume or not overrides):
        cfg = config.override(stored, overrides)     # the run's own config, a --config on top
    else:
        cfg = config.resolve(preset or "small", overrides)
    cfg.data.source = source if source in data.SOURCES else str(Path(source).resolve())
    if size is not None:
        if size < 8:
            raise UsageError(f"--size must be at least 8, got {size}")
        cfg.data.size = size
    cfg.data.size = cfg.data.size or data.default_size(source)
    cfg.data.channels = cfg.data.channels or data.default_channels(source)
    config.check_size(cfg)
    if stored is not None:
        diff = config.first_difference(extended(stored, cfg, out) if resume else stored, cfg)
        if diff:
            raise UsageError(f"{out} holds a run with a different config: {diff}; "
                             "use a new --out, or leave out --preset/--config to use the run's own"
                             + ("" if resume else " (with --resume, a --config may extend the "
                                "denoiser's steps and learning-rate schedule)"))
    return cfg


EXTENSIBLE = ("steps", "lr_schedule", "lr_decay_steps")


def extended(stored: config.RunConfig, cfg: config.RunConfig, out: Path) -> config.RunConfig:
    """`stored` with the denoiser's step count and learning-rate schedule taken from `cfg`, when
    those alone differ and the change rewrites no step already taken: the learning rate of
    every step before the denoiser's checkpoint stays the same, and the new end is not behind
    it. That is how a constant-rate run is trained longer, or cooled down at its end, on
    --resume (`rissole-edge train DATA --out RUN --resume --config longer.toml`). Otherwise
    `stored`, and the caller refuses the difference."""
    changed = copy.deepcopy(stored)
    for key in EXTENSIBLE:
        setattr(changed.denoiser, key, getattr(cfg.denoiser, key))
    if config.first_difference(changed, cfg):
        return stored
    path = out / "denoiser.safetensors"
    done = checkpoint.step_of(path) if path.exists() else 0
    if changed.denoiser.steps < done:
        raise UsageError(f"denoiser.steps {changed.denoiser.steps} is behind the run's checkpoint "
                         f"at step {done}: give at least {done}")
    rewritten = next((step for step in range(done) if not math.isclose(
        learning_rate(stored.denoiser, step), learning_rate(changed.denoiser, step), rel_tol=1e-9)), None)
    if rewritten is not None:
        raise UsageError(f"the new denoiser learning-rate schedule changes step {rewritten}, which the "
                         f"run has already taken (checkpoint at step {done}): start the decay at "
                         f"step {done} or later")
    return changed


REUSED_SECTIONS = ("data", "autoencoder", "database")


def reuse_stages(base: Path, out: Path, cfg: config.RunConfig) -> None:
    """Copy the autoencoder and database of the finished run `base` into `out`, so that
    denoiser variants (ablations, k, width) train on exactly the same latents and neighbours
    and skip the costly first stages. Refused unless the settings those stages depend on match."""
    base_path = base / "config.json"
    if not base_path.exists():
        raise UsageError(f"--reuse {base}: not a run directory (no config.json)")
    base_cfg = config.load(base_path)
    diff = config.first_difference(base_cfg, cfg, REUSED_SECTIONS)
    if diff:
        raise UsageError(f"--reuse {base}: its settings differ from this run's in {diff}; "
                         f"{', '.join(REUSED_SECTIONS)} settings must match")
    for stage in ("autoencoder", "database"):
        if not stage_complete(base, stage, base_cfg):
            raise UsageError(f"--reuse {base}: its {stage} stage is not complete")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("autoencoder.safetensors", "autoencoder.json"):
        if not (out / name).exists():
            shutil.copy2(base / name, out / name)
    if not (out / "database" / "meta.json").exists():
        shutil.rmtree(out / "database", ignore_errors=True)     # a copy cut short earlier
        shutil.copytree(base / "database", out / "database")


def check_partial(run: Path, stage: str, resume: bool, total: int) -> None:
    path = run / f"{stage}.safetensors"
    if path.exists() and not resume:
        step = checkpoint.step_of(path)
        if step < total:
            raise UsageError(f"the {stage} stage has a checkpoint at step {step}/{total} in {run}: "
                             "pass --resume to continue it")


def train(source: str, out: Path, preset: str | None = None, config_file: Path | None = None,
          stage: str = "all", max_minutes: float | None = None, resume: bool = False,
          progress: bool = True, reuse: Path | None = None, size: int | None = None,
          log: Callable[[str], None] | None = None) -> dict:
    """Run the requested stage(s); returns a summary (parameter counts, metrics, status, the
    estimate made before and the wall seconds each stage took). With `progress`, stages show
    a progress line on a terminal (log lines when piped); `log` gets the data warnings and the
    up-front estimate (the CLI prints them on stderr). Everything that can be refused (config,
    geometry, data) is refused before any stage trains."""
    if stage not in STAGES + ("all",):
        raise UsageError(f"unknown stage {stage!r}; choose autoencoder, database, denoiser or all")
    if max_minutes is not None and max_minutes <= 0:
        raise UsageError("--max-minutes must be positive")
    cfg = prepare(source, out, preset, config_file, resume, size)
    images = data.load(source, cfg.data)
    if len(images.train) < cfg.database.window + 2:
        raise DataError(f"{len(images.train)} training images are too few: need at least "
                        f"{cfg.database.window + 2} (database.window + 2)")
    deadline = time.monotonic() + max_minutes * 60 if max_minutes else None
    ctx = Context(out, cfg, deadline, progress)
    say = log if log is not None and ctx.main else (lambda msg: None)
    if images.skipped:
        say(f"skipped {len(images.skipped)} unreadable file(s), e.g. {images.skipped[0]}")
    if ctx.main:
        if reuse is not None:
            reuse_stages(reuse, out, cfg)
        out.mkdir(parents=True, exist_ok=True)
        config.save(cfg, out / "config.json")
    ctx.barrier()
    refuse_orphaned_stages(out, cfg)
    torch.manual_seed(cfg.seed)
    summary: dict = {"run": str(out), "status": "complete"}
    wanted = STAGES if stage == "all" else (stage,)
    remaining = steps_left(out, cfg, [s for s in wanted if stage != "all" or not stage_complete(out, s, cfg)])
    if progress and ctx.main and remaining:
        est = estimate.estimate(cfg, images.train.shape[-1], len(images.train), remaining, ctx.world, ctx.device)
        say(estimate.describe(est))
        summary["estimate_s"] = {name: round(e["seconds"], 1) for name, e in est.items()}
    summary["stage_s"] = {}
    try:
        with stop_on_signals(ctx):
            for name in wanted:
                done = stage_complete(out, name, cfg)
                if stage == "all" and done:
                    continue
                require_previous(out, name, cfg)
                started = time.monotonic()
                if name == "autoencoder":
                    check_partial(out, name, resume, cfg.autoencoder.steps)
                    summary["autoencoder"] = train_autoencoder(ctx, images)
                elif name == "database":
                    summary["database"] = {k: v for k, v in build_database(ctx, images).items() if k != "key_study"}
                else:
                    check_partial(out, name, resume, cfg.denoiser.steps)
                    summary["denoiser"] = train_denoiser(ctx)
                summary["stage_s"][name] = round(time.monotonic() - started, 1)
    except Stopped as e:
        summary["status"] = str(e)
        summary["interrupted"] = ctx.signalled
    return summary


def steps_left(run: Path, cfg: config.RunConfig, stages: list[str]) -> dict[str, int]:
    """Steps each of `stages` has still to run (1 for the database), from its checkpoint; stages
    with none left are left out."""
    left = {}
    for name in stages:
        if name == "database":
            left[name] = 1
            continue
        total = cfg.autoencoder.steps if name == "autoencoder" else cfg.denoiser.steps
        path = stage_output(run, name)
        steps = total - (min(checkpoint.step_of(path), total) if path.exists() else 0)
        if steps:
            left[name] = steps
    return left


def stage_output(run: Path, stage: str) -> Path:
    """What a stage writes: the database folder, or the other stages' checkpoint file."""
    return run / "database" if stage == "database" else run / f"{stage}.safetensors"


def stage_complete(run: Path, stage: str, cfg: config.RunConfig) -> bool:
    if stage == "database":
        return (stage_output(run, stage) / "meta.json").exists()
    path = stage_output(run, stage)
    total = cfg.autoencoder.steps if stage == "autoencoder" else cfg.denoiser.steps
    return path.exists() and checkpoint.step_of(path) >= total


def refuse_orphaned_stages(run: Path, cfg: config.RunConfig) -> None:
    """Refuse to retrain a stage that later stages were built on. A run whose autoencoder went
    missing (deleted to save space, say) would otherwise get a new one, and the database and
    denoiser that remain would silently belong to latents that no longer exist: hours of
    training lost, or worse, a run that trains on but no longer makes sense."""
    for i, stage in enumerate(STAGES):
        if stage_complete(run, stage, cfg):
            continue
        later = [name for name in STAGES[i + 1:] if stage_output(run, name).exists()]
        if later:
            raise UsageError(f"{run}: its {' and '.join(later)} {'was' if len(later) == 1 else 'were'} "
                             f"built on a {stage} stage that is now missing or incomplete; restore the "
                             f"{stage} (--reuse BASE copies it from a finished run) or use a new --out")
        return


def require_previous(run: Path, stage: str, cfg: config.RunConfig) -> None:
    before = STAGES[:STAGES.index(stage)]
    for name in before:
        if not stage_complete(run, name, cfg):
            raise UsageError(f"the {stage} stage needs a complete {name} stage in {run}: "
                             f"run 'rissole-edge train ... --stage {name}' (or --stage all) first")
