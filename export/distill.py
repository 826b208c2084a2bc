"""`rissole-edge distill`: a student denoiser that samples in N steps what its teacher does in many.

Progressive-distillation targets (Salimans & Ho 2022) in one round: for a student step from
t to t' on the runtime's N-step DDIM grid, the teacher runs its own DDIM from the same noisy
x_t to t' in the sub-steps that a `teacher_steps` run spends there, and the student is trained
so that ONE DDIM step of its own lands where the teacher did. The student predicts v (the
module still returns epsilon, see denoiser.UNet), starts from the teacher's weights and folds
the teacher's guidance into itself, so a distilled bundle makes one denoiser call per step.
docs/method.md says why this and not consistency distillation.

The student lives in a run directory of its own (distill.json, config.json, student.safetensors,
metrics.jsonl). Like `train`, it checkpoints atomically every `checkpoint_every` steps, stops
cleanly on --max-minutes or a signal, and a resumed run ends with the same weights as an
uninterrupted one: every batch is drawn from a generator seeded by (seed, step). When training
ends, the EMA student is written as denoiser.safetensors next to the teacher's autoencoder and
database (a teacher run) or a copy of the teacher bundle, and `rissole-edge export` turns the
directory into a bundle whose manifest says it is distilled and for how many steps.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import rissole_edge
from rissole_edge import blocks
from rissole_edge.bundle import Bundle, Spec, check_guidance
from rissole_edge.errors import UsageError
from rissole_edge.schedule import alphas_cumprod, sampling_timesteps

from . import checkpoint, config, denoiser, graph, onnx_export, pack, quantize, teacher as teachers
from .train import Context, Stopped, reuse_stages, stop_on_signals

SETTINGS_FILE = "distill.json"
STUDENT = "student"                 # student.safetensors: the resumable checkpoint
TEACHER_BUNDLE = "teacher.rissole"  # a copy of the teacher when it is a bundle
MAX_STEPS = 64


@dataclass
class Settings:
    """What a distillation is: its run directory refuses to continue under other settings."""
    source: str                 # the teacher: a run directory or a .rissole bundle (absolute path)
    steps: int                  # sampling steps the student is made for
    teacher_steps: int = 50     # the teacher's DDIM run whose sub-steps give the targets
    guidance: float = 1.0       # the teacher's guidance, folded into the student
    train_steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-4
    ema_decay: float = 0.995
    checkpoint_every: int = 100
    seed: int = 0


def grid(alpha_bar: np.ndarray, steps: int, teacher_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The student's N steps and, for each, the teacher's sub-steps.

    Returns `starts` (N,) the student's timesteps (the runtime's DDIM grid) and `sub` (N, M+1):
    row i lists the timesteps where the teacher evaluates between starts[i] and the next student
    timestep, then that next timestep (-1: the clean end), padded with -2. Each interval gets
    sub-steps in proportion to its length, so the teacher walks it as a `teacher_steps` run would."""
    total = len(alpha_bar)
    starts = sampling_timesteps(total, steps)
    rows = []
    for i, start in enumerate(starts):
        end = int(starts[i + 1]) if i + 1 < len(starts) else -1
        m = max(1, round(teacher_steps * (start - end) / total))
        inner = np.linspace(start, end, m + 1)[:-1] if end >= 0 else np.linspace(start, 0, m)
        ts = list(dict.fromkeys(int(round(v)) for v in inner))
        rows.append(ts + [end])
    width = max(len(r) for r in rows)
    sub = np.full((len(rows), width), -2, np.int64)
    for i, r in enumerate(rows):
        sub[i, :len(r)] = r
    return starts, sub


class TeacherEps:
    """The teacher's (guided) epsilon with onnxruntime: both guidance halves in one call. A
    border-conditioned teacher (`border` w > 0, `blocks_per_side` B) is called on whole images,
    P = B*B rows each in position order, and gets each row's window of its image's x, as the
    runtime gives it (`rissole_edge.blocks.windows`); so is a cross-block teacher (the caller
    gives it whole images)."""

    def __init__(self, model: bytes, guidance: float, threads: int, border: int = 0, blocks_per_side: int = 1):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.guidance, self.border, self.blocks_per_side = guidance, border, blocks_per_side

    def window(self, x: np.ndarray) -> np.ndarray | None:
        """Each row's window of its image's x (rows: whole images in position order), or None."""
        return blocks.row_windows(x, self.blocks_per_side, self.border) if self.border else None

    def __call__(self, x: np.ndarray, t: np.ndarray, pos: np.ndarray, cond: np.ndarray | None) -> np.ndarray:
        guided = cond is not None and self.guidance != 1.0
        window = self.window(x)
        if guided:
            x, t, pos, cond = (np.concatenate([v, v]) for v in (x, t, pos, cond))
            cond[len(cond) // 2:] = 0.0
            window = None if window is None else np.concatenate([window, window])
        feeds = {"x": x, "t": t, "pos": pos, "cond": cond, "window": window}
        eps = self.session.run(["eps"], {k: v for k, v in feeds.items() if k in self.inputs})[0]
        if not guided:
            return eps
        c, u = eps[:len(eps) // 2], eps[len(eps) // 2:]
        return u + self.guidance * (c - u)


def alpha_of(alpha_bar: np.ndarray, t: np.ndarray) -> np.ndarray:
    """alpha_bar at timesteps t, with t = -1 the clean end (alpha_bar 1)."""
    return np.where(t >= 0, alpha_bar[np.clip(t, 0, None)], 1.0)


def teacher_targets(eps_fn: TeacherEps, alpha_bar: np.ndarray, sub: np.ndarray, interval: np.ndarray,
                    xt: np.ndarray, pos: np.ndarray, cond: np.ndarray | None) -> np.ndarray:
    """The x0 that makes one student DDIM step from x_t land where the teacher's DDIM sub-steps do.

    With a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar) at t and t' and r = s'/s, one DDIM step
    gives x_t' = a' x0 + r (x_t - a x0); solving for x0 with the teacher's x_t' gives the target.
    For a border-conditioned teacher the rows are whole images (all P blocks of an image share
    its interval, so the rows still active at a sub-step are whole images too)."""
    x = xt.astype(np.float64)
    rows = sub[interval]                                      # (B, M+1)
    for j in range(rows.shape[1] - 1):
        active = np.flatnonzero(rows[:, j + 1] >= -1)
        if not len(active):
            break
        t, t_next = rows[active, j], rows[active, j + 1]
        eps = eps_fn(x[active].astype(np.float32), t.astype(np.float32), pos[active],
                     None if cond is None else cond[active]).astype(np.float64)
        a_t = alpha_of(alpha_bar, t)[:, None, None, None]
        a_n = alpha_of(alpha_bar, t_next)[:, None, None, None]
        x0 = (x[active] - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        x[active] = np.sqrt(a_n) * x0 + np.sqrt(1 - a_n) * eps
    start, end = sub[interval, 0], _last_of_rows(sub)[interval]
    a, s = np.sqrt(alpha_of(alpha_bar, start)), np.sqrt(1 - alpha_of(alpha_bar, start))
    a2, s2 = np.sqrt(alpha_of(alpha_bar, end)), np.sqrt(1 - alpha_of(alpha_bar, end))
    r = (s2 / s)[:, None, None, None]
    return ((x - r * xt) / (a2 - (s2 / s) * a)[:, None, None, None]).astype(np.float32)


def _last_of_rows(sub: np.ndarray) -> np.ndarray:
    """Each row's end (the next student timestep, or -1)."""
    lengths = (sub >= -1).sum(axis=1)
    return sub[np.arange(len(sub)), lengths - 1]


# ---------------------------------------------------------------- the run directory

def _load_teacher(settings: Settings, preset: str | None, config_file: Path | None) -> teachers.Teacher:
    source = Path(settings.source)
    if source.is_dir():
        return teachers.from_run(source, settings.guidance)
    cfg = config.resolve(preset or "small", config.read_config_file(config_file) if config_file else {})
    return teachers.from_bundle(source, cfg)


def _default_config(source: Path) -> Path | None:
    """A bundle's recipe next to it (models/NAME.toml beside models/NAME.rissole), if there."""
    beside = source.with_suffix(".toml")
    return beside if beside.exists() else None


def _check(source: Path, steps: int, out: Path, settings_in: dict) -> None:
    if not source.exists():
        raise UsageError(f"teacher {source} not found: give a training run directory or a .rissole bundle")
    if source.is_dir() and not (source / "config.json").exists():
        raise UsageError(f"{source} is not a training run (no config.json)")
    if not 1 <= steps <= MAX_STEPS:
        raise UsageError(f"--steps must be between 1 and {MAX_STEPS}, got {steps}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if out.resolve() == source.resolve():
        raise UsageError("--out must be a new folder, not the teacher")
    for key in ("teacher_steps", "train_steps", "batch_size"):
        if key in settings_in and settings_in[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be positive")
    check_guidance(settings_in.get("guidance", 1.0), "--guidance")


def _settings(source: Path, steps: int, out: Path, resume: bool, given: dict) -> Settings:
    """This run's settings: new, or the stored ones, which the given ones must not contradict,
    except that an unfinished run may be given another --train-steps on --resume (the learning
    rate is constant, so the count only bounds the loop, as denoiser.steps does in `train`)."""
    path = out / SETTINGS_FILE
    if path.exists():
        stored = Settings(**json.loads(path.read_text()))
        wanted = dataclasses.replace(stored, source=str(source.resolve()), steps=steps,
                                     **{k: v for k, v in given.items() if v is not None})
        student = out / f"{STUDENT}.safetensors"
        if resume and wanted.train_steps != stored.train_steps and not (out / "denoiser.safetensors").exists():
            done = checkpoint.step_of(student) if student.exists() else 0
            if wanted.train_steps < done:
                raise UsageError(f"--train-steps {wanted.train_steps} is below the {done} steps {out} has done")
            stored = dataclasses.replace(stored, train_steps=wanted.train_steps)
        if wanted != stored:
            diff = next(f.name for f in dataclasses.fields(Settings) if getattr(wanted, f.name) != getattr(stored, f.name))
            raise UsageError(f"{out} holds a distillation with another {diff} "
                             f"({getattr(stored, diff)!r} vs {getattr(wanted, diff)!r}): use a new --out")
        if not resume and (out / f"{STUDENT}.safetensors").exists() and not (out / "denoiser.safetensors").exists():
            raise UsageError(f"{out} holds an unfinished distillation: pass --resume to continue it")
        return stored
    if resume:
        raise UsageError(f"nothing to resume: {out} holds no distillation ({SETTINGS_FILE})")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} is not empty: choose a new folder")
    guidance = given.get("guidance")
    if guidance is None:
        guidance = Bundle.open(source).manifest.get("sampling", {}).get("guidance", 1.0) if source.is_file() else 1.0
    values = {k: v for k, v in given.items() if v is not None and k != "guidance"}
    return Settings(source=str(source.resolve()), steps=steps, guidance=float(guidance), **values)


def _batch_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + 7_919) * 2_000_003 + step)


def distill(source: Path, steps: int, out: Path, preset: str | None = None, config_file: Path | None = None,
            max_minutes: float | None = None, resume: bool = False, progress: bool = True,
            **given: float | int | None) -> dict:
    """Distil `source` (a run or a bundle) into an N-step student in `out`; returns a summary."""
    source, out = Path(source), Path(out)
    _check(source, steps, out, {k: v for k, v in given.items() if v is not None})
    if max_minutes is not None and max_minutes <= 0:
        raise UsageError("--max-minutes must be positive")
    settings = _settings(source, steps, out, resume, given)
    if source.is_file() and config_file is None:
        config_file = _default_config(source)
    t = _load_teacher(settings, preset, config_file)
    cfg = copy.deepcopy(t.cfg)
    cfg.denoiser.prediction = "v"
    cfg.checkpoint_every = settings.checkpoint_every
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS_FILE).write_text(json.dumps(dataclasses.asdict(settings), indent=2) + "\n")
    config.save(cfg, out / "config.json")
    summary: dict = {"run": str(out), "status": "complete", "steps": steps}
    if (out / "denoiser.safetensors").exists():
        return summary
    deadline = time.monotonic() + max_minutes * 60 if max_minutes else None
    ctx = Context(out, cfg, deadline, progress)
    torch.manual_seed(settings.seed)
    try:
        with stop_on_signals(ctx):
            ema = _train(ctx, t, settings)
    except Stopped as e:
        summary.update(status=str(e), interrupted=ctx.signalled)
        return summary
    _finish(out, source, cfg, ema)
    return summary


def _train(ctx: Context, t: teachers.Teacher, s: Settings) -> torch.nn.Module:
    cfg = ctx.cfg
    latents = t.latents
    n, positions, c, side, _ = latents.shape
    latent_side = side if cfg.denoiser.kind == "whole" else side * cfg.denoiser.blocks_per_side
    student = denoiser.build(cfg.denoiser, c, latent_side)
    student.load_state_dict(t.net.state_dict())
    student.train()
    ema = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=s.lr)
    modules, optimizers = {"model": student, "ema": ema}, {"optim": opt}
    path = ctx.run / f"{STUDENT}.safetensors"
    start = checkpoint.restore(path, modules, optimizers) if path.exists() else 0
    alpha_bar = alphas_cumprod(cfg.denoiser.schedule, cfg.denoiser.timesteps)
    starts, sub = grid(alpha_bar, s.steps, s.teacher_steps)
    eps_fn = TeacherEps(t.model, s.guidance, torch.get_num_threads(), student.border, cfg.denoiser.blocks_per_side)
    # A border-conditioned or cross-block pair learns on whole images (all P blocks, one interval
    # and one draw of neighbours each, as the runtime samples them): the teacher's sub-steps need
    # every block.
    together = positions if student.border or student.mixer is not None else 1
    neighbours = torch.from_numpy(np.asarray(t.neighbours, dtype=np.int64))
    k = student.k
    a_start = torch.from_numpy(np.sqrt(alpha_of(alpha_bar, starts))).float()
    s_start = torch.from_numpy(np.sqrt(1 - alpha_of(alpha_bar, starts))).float()
    snr = (a_start / s_start) ** 2

    def save(step: int) -> None:
        checkpoint.save(path, step, modules, optimizers)

    for step in ctx.loop("distill", start, s.train_steps, save):
        g = _batch_generator(s.seed, step)
        if together > 1:
            images = max(1, s.batch_size // together)
            idx = torch.randint(n, (images,), generator=g).repeat_interleave(together)
            pos = torch.arange(positions).repeat(images)
        else:
            idx = torch.randint(n, (s.batch_size,), generator=g)
            pos = torch.randint(positions, (s.batch_size,), generator=g)
        b = len(idx)
        x0 = latents[idx, pos]
        cond = None
        if k:
            ranks = torch.rand(b // together, neighbours.shape[1], generator=g).argsort(1)[:, :k].sort(1).values
            nb = neighbours[idx[:, None], ranks.repeat_interleave(together, 0)]
            cond = latents[nb, pos[:, None]].reshape(b, k * c, side, side)
        interval = torch.randint(len(starts), (b // together,), generator=g).repeat_interleave(together)
        noise = torch.randn(x0.shape, generator=g)
        a, sd = a_start[interval].view(-1, 1, 1, 1), s_start[interval].view(-1, 1, 1, 1)
        xt = a * x0 + sd * noise
        target = torch.from_numpy(teacher_targets(eps_fn, alpha_bar, sub, interval.numpy(), xt.numpy(),
                                                  pos.numpy(), None if cond is None else cond.numpy()))
        tt = torch.from_numpy(starts[interval.numpy()]).float()
        window = eps_fn.window(xt.numpy())
        eps = student(xt, tt, pos, cond, None if window is None else torch.from_numpy(window))
        x0_pred = (xt - sd * eps) / a
        # truncated SNR weighting (Salimans & Ho): x0 error at high noise, epsilon error at low
        weight = torch.clamp(snr[interval], min=1.0).view(-1, 1, 1, 1)
        loss = (weight * (x0_pred - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            decay = min(s.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(student.parameters()), 1 - decay)
        if (step + 1) % cfg.log_every == 0:
            ctx.log("distill", step + 1, loss=loss.item())
    return ema


def _finish(out: Path, source: Path, cfg: config.RunConfig, ema: torch.nn.Module) -> None:
    """Make `out` exportable: the teacher's other stages (or bundle) beside the student, which
    is written last, as denoiser.safetensors, so that its presence means "distillation done"."""
    if source.is_dir():
        reuse_stages(source, out, cfg)
    elif not (out / TEACHER_BUNDLE).exists():
        tmp = out / (TEACHER_BUNDLE + ".tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(out / TEACHER_BUNDLE)
    checkpoint.save(out / "denoiser.safetensors", cfg.denoiser.steps, {"model": copy.deepcopy(ema), "ema": ema}, {})


def made_from_bundle(run: Path) -> bool:
    """Whether `run` was made from a bundle (exported by `export_over_bundle`): a student of it,
    or a fine-tune of its denoiser (benchmarks/ablations/seams.py) that holds a copy of it as
    teacher.rissole beside config.json and denoiser.safetensors."""
    return (Path(run) / TEACHER_BUNDLE).exists()


def distilled_fields(run: Path, guidance: float = 1.0) -> dict | None:
    """The manifest's record of a distilled run (None for an ordinary run): `sampling` names
    the step count the student was made for, and `distilled` says from what and how."""
    path = Path(run) / SETTINGS_FILE
    if not path.exists():
        return None
    if guidance != 1.0:
        raise UsageError("a distilled run has its teacher's guidance folded in: export it without --guidance")
    s = Settings(**json.loads(path.read_text()))
    return {"sampling": {"guidance": 1.0, "sampler": "ddim", "steps": s.steps, "distilled_steps": s.steps},
            "distilled": {"teacher": Path(s.source).name, "teacher_steps": s.teacher_steps,
                          "teacher_guidance": s.guidance, "train_steps": s.train_steps, "prediction": "v",
                          "method": "progressive-distillation targets in one round (docs/method.md)"}}


class _Recording:
    """An onnxruntime session that keeps the inputs of every call (int8 calibration)."""

    def __init__(self, session: ort.InferenceSession, calls: list[dict]):
        self.session, self.calls = session, calls

    def get_inputs(self) -> list:
        return self.session.get_inputs()

    def run(self, outputs: list[str], feeds: dict) -> list[np.ndarray]:
        self.calls.append({k: np.array(v) for k, v in feeds.items()})
        return self.session.run(outputs, feeds)


def export_over_bundle(run: Path, out: Path, mode: str, target: str, calibration_samples: int, log,
                       signing_key: bytes | None, guidance: float) -> dict:
    """The teacher bundle with the student (or a fine-tune of the teacher's denoiser) as its
    denoiser: decoder, encoder, database and every other manifest field are the teacher's, so
    nothing but the denoiser (and `denoiser.border`, the new one's) can differ. A fine-tune
    keeps the teacher's recommended sampling; `guidance` other than 1 replaces its guidance."""
    from .exporter import PARITY_IMAGES, _psnr, denoiser_fields
    from rissole_edge.generator import Generator

    run, out = Path(run), Path(out)
    if not (run / "denoiser.safetensors").exists():
        raise UsageError(f"{run}: the distillation is not finished: continue it with 'rissole-edge distill ... --resume'")
    if mode not in ("int8", "fp32") or target not in quantize.TARGETS:
        raise UsageError(f"--quantize must be int8 or fp32 and --target one of {', '.join(quantize.TARGETS)}")
    check_guidance(guidance, "--guidance")
    if not out.parent.is_dir() or out.is_dir():
        raise UsageError(f"cannot write {out}: not a file in an existing folder")
    fields = distilled_fields(run, guidance)         # None: a fine-tune, not a student
    teacher = Bundle.open(run / TEACHER_BUNDLE)
    manifest, members = pack.contents(teacher)
    for stale in ("graph", "parity"):     # measured on the teacher's denoiser, remeasured below
        manifest.pop(stale, None)
    spec = Spec.from_manifest(teacher.manifest)
    steps = fields["sampling"]["steps"] if fields else spec.steps
    net = denoiser.build(config.load(run / "config.json").denoiser, spec.latent_channels, spec.latent_side)
    net.load_state_dict(checkpoint.load_weights(run / "denoiser.safetensors", "ema"))
    fp32 = onnx_export.denoiser(net.eval())
    manifest.update(fields or {}, name=out.stem, tool_version=rissole_edge.__version__,
                    created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    kept = {k: v for k, v in manifest.get("denoiser", {}).items() if k != "cross_block"}   # the new net's say
    manifest["denoiser"] = {**kept, **denoiser_fields(net)}
    if fields:
        manifest["distilled"].update(teacher=teacher.manifest.get("name", manifest["distilled"]["teacher"]),
                                     teacher_sha256=hashlib.sha256((run / TEACHER_BUNDLE).read_bytes()).hexdigest())
    elif guidance != 1.0:
        manifest["sampling"] = {**manifest.get("sampling", {}), "guidance": guidance}
    quant = dict(teacher.manifest.get("quantization", {"mode": "fp32"}))
    fp32_bundle = Bundle.in_memory({**manifest, "quantization": quant}, {**members, "denoiser.onnx": fp32})
    feeds: list[dict] = []
    log(f"collecting calibration inputs from {calibration_samples} {steps}-step trajectories")
    with Generator.open(fp32_bundle, threads=1) as gen:
        gen.denoiser = _Recording(gen.denoiser, feeds)
        gen.generate(calibration_samples, seed=spec.images, steps=steps, as_array=True)
    parity: dict = {}
    if mode == "int8":
        log(f"quantizing the denoiser to int8 for {target} on {len(feeds)} batches")
        model, info = quantize.quantize(fp32, feeds, target, keep_fp32=True, correct_bias=True)
        model, manifest["graph"] = graph.optimize(model)
        manifest["graph"]["decoder_rewrites"] = teacher.manifest.get("graph", {}).get("decoder_rewrites", [])
        quant.update({k: v for k, v in info.items() if k != "fp32_nodes"}, denoiser_fp32_nodes=info["fp32_nodes"])
        int8_bundle = Bundle.in_memory({**manifest, "quantization": quant}, {**members, "denoiser.onnx": model})
        with Generator.open(fp32_bundle, threads=1) as g32, Generator.open(int8_bundle, threads=1) as g8:
            psnr = _psnr(g32.generate(PARITY_IMAGES, seed=1234, steps=steps, as_array=True),
                         g8.generate(PARITY_IMAGES, seed=1234, steps=steps, as_array=True))
        parity = {"int8_vs_fp32_psnr_mean": float(np.mean(psnr)), "int8_vs_fp32_psnr_min": float(min(psnr)),
                  "parity_images": PARITY_IMAGES, "parity_steps": steps}
    else:
        model = fp32
        quant = {**quant, "models": [n for n in quant.get("models", []) if n != "denoiser.onnx"],
                 "fp32_models": sorted(set(quant.get("fp32_models", [])) | {"denoiser.onnx"})}
    manifest.update(quantization=quant, parity=parity)
    manifest["memory"] = {**manifest["memory"], "block_bytes": graph.activation_bytes(fp32)}
    pack.write(out, manifest, {**members, "denoiser.onnx": model}, signing_key)
    return manifest
