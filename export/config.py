"""One typed config for a whole run: presets, file overrides, validation and persistence.

A run directory stores the resolved config as `config.json`; every stage reads it from there,
so a resumed or re-exported run always sees exactly the settings it was trained with.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rissole_edge.errors import UsageError
from rissole_edge.images import FITS
from rissole_edge.schedule import SCHEDULES


class ConfigError(UsageError):
    """A config that cannot be used; the message is meant for the user as it is."""


@dataclass
class DataConfig:
    source: str = ""                 # a built-in source (data.SOURCES) or an image folder (set by train)
    size: int | None = None          # square image side in pixels; None = the source's default
    channels: int | None = None      # 1 (grey) or 3 (RGB); None = the source's default
    background: str = "#ffffff"      # RGBA images are composited on this colour
    fit: str = "pad"                 # to the size square: "pad" (small) / crop (large), "crop", "stretch"
    test_percent: int = 10           # folders without an official split: share held out


@dataclass
class AutoencoderConfig:
    channels: int = 16               # width of the first level (full resolution: the costly one)
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one level per entry; each after the first halves the side
    latent_channels: int = 4
    codebook_size: int = 256
    commitment: float = 0.25
    disc_weight: float = 0.0         # 0 disables the patch discriminator
    disc_start: int = 2000           # step from which the discriminator loss is applied
    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "constant"   # "constant", or "cosine": from lr down to 0 over `steps`


@dataclass
class DatabaseConfig:
    key: str = "latent"              # "latent" (whole latent) or "block:N" (block N only)
    key_dim: int = 64                # PCA-reduce keys to this many dims (0 = keep all)
    hnsw_m: int = 16
    ef_construction: int = 200
    target_recall: float = 0.95      # ef is the smallest that reaches this recall@k
    window: int = 8                  # neighbours kept per image; k of them are drawn per sample


@dataclass
class DenoiserConfig:
    kind: str = "block"              # "block", "block-noretrieval" or "whole"
    blocks_per_side: int = 2
    k: int = 4                       # neighbours per block
    fusion: str = "add"              # "add" (the paper) or "concat"
    channels: int = 40
    channel_mult: tuple[int, ...] = (1, 2)
    res_blocks: int = 2
    cond_drop: float = 0.1           # share of samples trained without neighbours (guidance)
    cond_noise: float = 0.0          # std of noise added to neighbour blocks in training
    border: int = 0                  # >0: each block also sees this many latent rows/columns of its adjacent blocks (x_t)
    seam_loss: float = 0.0           # >0: weight of the border-consistency loss (batches of adjacent block pairs)
    self_condition: bool = False     # the window also carries the previous call's x0 estimate (needs border > 0)
    cross_block: bool = False        # attention across the blocks of an image at the bottleneck (bundles carry it)
    schedule: str = "linear"
    timesteps: int = 1000
    prediction: str = "eps"          # "eps"; "v" for distilled few-step students (docs/method.md)
    steps: int = 20000
    batch_size: int = 256
    lr: float = 2e-4
    lr_schedule: str = "constant"    # "constant", or "cosine": down to 0 over the last `lr_decay_steps`
    lr_decay_steps: int = 0          # for "cosine": decay over the last this many steps (0: all of them)
    ema_decay: float = 0.999


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    sample_every: int = 2000

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # Minutes on 2 cores: for trying the pipeline on new data and for tests.
    "tiny": {
        "autoencoder": {"channels": 8, "codebook_size": 64, "steps": 400, "batch_size": 64},
        "database": {"key_dim": 32, "window": 6},
        "denoiser": {"channels": 16, "channel_mult": (1, 2), "res_blocks": 1, "steps": 600,
                     "batch_size": 128, "lr": 1e-3, "ema_decay": 0.99},
        "checkpoint_every": 100, "sample_every": 300,
    },
    # About an hour on 2 cores; a 1.3M-parameter denoiser.
    "small": {},
    # Several hours on 2 cores, or a GPU.
    "base": {
        "autoencoder": {"channels": 24, "codebook_size": 512, "steps": 20000, "batch_size": 128},
        "database": {"window": 12},
        "denoiser": {"channels": 48, "steps": 60000, "k": 6},
    },
}


def _merge(target: Any, overrides: dict[str, Any], where: str) -> None:
    """Apply nested `overrides` onto the dataclass `target`, refusing unknown or mistyped keys."""
    fields = {f.name: f for f in dataclasses.fields(target)}
    for key, value in overrides.items():
        name = f"{where}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {name!r}; known: {', '.join(fields)}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {name!r} must be a table")
            _merge(current, value, f"{name}.")
            continue
        if isinstance(current, tuple) or (isinstance(value, list) and current is None):
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) for v in value):
                raise ConfigError(f"config key {name!r} must be a list of integers")
            value = tuple(value)
        elif isinstance(current, bool) or isinstance(current, str):
            if not isinstance(value, type(current)):
                raise ConfigError(f"config key {name!r} must be a {type(current).__name__}")
        elif isinstance(current, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"config key {name!r} must be a number")
            value = float(value)
        elif isinstance(current, int) or current is None:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"config key {name!r} must be an integer")
        setattr(target, key, value)


def _validate(cfg: RunConfig) -> None:
    ae, db, dn = cfg.autoencoder, cfg.database, cfg.denoiser
    checks = [
        (cfg.data.channels in (None, 1, 3), "data.channels must be 1 or 3"),
        (cfg.data.size is None or cfg.data.size >= 8, "data.size must be at least 8"),
        (0 <= cfg.data.test_percent < 100, "data.test_percent must be in [0, 100)"),
        (cfg.data.fit in FITS, f"data.fit must be one of {', '.join(FITS)}"),
        (len(ae.channel_mult) >= 1, "autoencoder.channel_mult needs at least one level"),
        (2 <= ae.codebook_size <= 65536, "autoencoder.codebook_size must be in [2, 65536]"),
        (ae.lr_schedule in ("constant", "cosine"), "autoencoder.lr_schedule must be 'constant' or 'cosine'"),
        (dn.lr_schedule in ("constant", "cosine"), "denoiser.lr_schedule must be 'constant' or 'cosine'"),
        (0 <= dn.lr_decay_steps <= dn.steps, "denoiser.lr_decay_steps must be in [0, denoiser.steps]"),
        (db.key == "latent" or (db.key.startswith("block:") and db.key[6:].isdigit()),
         "database.key must be 'latent' or 'block:N'"),
        (0 < db.target_recall <= 1, "database.target_recall must be in (0, 1]"),
        (dn.kind in ("block", "block-noretrieval", "whole"),
         "denoiser.kind must be 'block', 'block-noretrieval' or 'whole'"),
        (dn.fusion in ("add", "concat"), "denoiser.fusion must be 'add' or 'concat'"),
        (dn.schedule in SCHEDULES, f"denoiser.schedule must be one of {', '.join(SCHEDULES)}"),
        (dn.prediction in ("eps", "v"), "denoiser.prediction must be 'eps' or 'v'"),
        (dn.blocks_per_side >= 1, "denoiser.blocks_per_side must be at least 1"),
        (dn.k >= 1, "denoiser.k must be at least 1"),
        (db.window >= dn.k, "database.window must be at least denoiser.k"),
        (0 <= dn.cond_drop < 1, "denoiser.cond_drop must be in [0, 1)"),
        (dn.border >= 0 and (dn.border == 0 or dn.kind != "whole"),
         "denoiser.border must be >= 0, and 0 for the whole-latent model (it has no adjacent blocks)"),
        (not dn.self_condition or dn.border > 0,
         "denoiser.self_condition needs denoiser.border > 0 (the estimate travels in the block's window)"),
        (not dn.cross_block or (dn.kind != "whole" and dn.blocks_per_side > 1
                                and dn.batch_size % dn.blocks_per_side ** 2 == 0),
         "denoiser.cross_block needs a block denoiser with blocks_per_side > 1 and a batch_size "
         "that is a multiple of blocks_per_side^2 (a batch holds every block of its images)"),
        (dn.seam_loss >= 0 and (dn.seam_loss == 0 or (dn.kind != "whole" and dn.blocks_per_side > 1)),
         "denoiser.seam_loss must be >= 0, and 0 without adjacent blocks (whole model, blocks_per_side 1)"),
        (all(x > 0 for x in (ae.steps, ae.batch_size, dn.steps, dn.batch_size)),
         "steps and batch sizes must be positive"),
        (cfg.checkpoint_every > 0 and cfg.log_every > 0 and cfg.sample_every > 0,
         "checkpoint_every, log_every and sample_every must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def size_multiple(cfg: RunConfig) -> int:
    """Image sides must be a multiple of this: the autoencoder halves the side once per level
    after the first, the latent is cut into blocks_per_side^2 blocks (one for "whole"), and the
    denoiser halves a block once per level after the first."""
    autoencoder = 2 ** (len(cfg.autoencoder.channel_mult) - 1)
    blocks = 1 if cfg.denoiser.kind == "whole" else cfg.denoiser.blocks_per_side
    return autoencoder * blocks * 2 ** (len(cfg.denoiser.channel_mult) - 1)


def check_size(cfg: RunConfig) -> None:
    """Refuse, before anything trains, an image size the models cannot divide, naming the
    nearest sizes that work."""
    size, step = cfg.data.size, size_multiple(cfg)
    if size is None or size % step == 0:
        return
    below, above = size // step * step, (size // step + 1) * step
    nearest = f"{below} or {above}" if below >= max(8, step) else f"{above}"
    raise ConfigError(f"data.size {size} does not suit this model: the autoencoder's downsampling, the block "
                      f"grid and the denoiser's downsampling need a multiple of {step}: use --size {nearest}")


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML or JSON config file into a nested dict of overrides."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {e}") from None


def resolve(preset: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Build the config of a run: defaults, then the preset, then the user's overrides."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = RunConfig()
    _merge(cfg, PRESETS[preset], "")
    return override(cfg, overrides)


def override(cfg: RunConfig, overrides: dict[str, Any] | None) -> RunConfig:
    """A copy of `cfg` with the user's overrides applied and checked (a resumed run's own config
    with a --config file on top)."""
    cfg = copy.deepcopy(cfg)
    _merge(cfg, overrides or {}, "")
    _validate(cfg)
    return cfg


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a config saved by `save` (no preset applied: the file is complete)."""
    cfg = RunConfig()
    _merge(cfg, data, "")
    _validate(cfg)
    return cfg


def save(cfg: RunConfig, path: Path) -> None:
    path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def load(path: Path) -> RunConfig:
    return from_dict(json.loads(path.read_text()))


def first_difference(a: RunConfig, b: RunConfig, sections: tuple[str, ...] | None = None) -> str | None:
    """Name the first setting that differs between two configs (only within `sections`, if
    given), for a one-line error."""
    def walk(x: Any, y: Any, where: str) -> str | None:
        if isinstance(x, dict):
            for key in x:
                found = walk(x[key], y.get(key), f"{where}{key}.")
                if found:
                    return found
            return None
        return f"{where[:-1]} ({x!r} vs {y!r})" if x != y else None
    def plain(cfg: RunConfig) -> dict:
        d = json.loads(json.dumps(cfg.to_dict()))
        return d if sections is None else {k: d[k] for k in sections}
    return walk(plain(a), plain(b), "")
