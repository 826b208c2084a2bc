"""`Generator`: open a bundle, then query -> neighbour blocks -> denoise blocks -> decode.

Every block is denoised from its own noise, conditioned only on the same-position blocks of
the image's k neighbours, so blocks of many images can share one denoiser call. How many do is
the memory planner's decision (budget.py). One Generator may be shared by threads: calls are
serialised on the heavy part so that the process stays within its memory budget.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from . import blocks, budget, rng, sampler, shipped, workers
from .preview import Preview, PreviewFn, default_every
from .bundle import ROWS_PER_ITEM, Bundle, BundleError, Spec, check_guidance
from .errors import UsageError
from .images import fit, from_uint8, to_pil, to_uint8
from .retrieval import Database
from .schedule import alphas_cumprod

if TYPE_CHECKING:
    from PIL import Image     # imported where a picture is made or read: a default generate never needs it

MAX_IMAGES = 10_000
Progress = Callable[[int, int], None]
GroupDone = Callable[[int, np.ndarray], None]


@dataclass(frozen=True)
class Query:
    """What an image is generated "from": a database entry, an image, or a class label (at most
    one: the CLI refuses two of --query-id, --like and --label, and so does the API, instead of
    silently letting one win)."""
    entry: int | None = None
    like: str | Path | Image.Image | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("entry", "like", "label") if getattr(self, name) is not None]
        if len(given) > 1:
            raise UsageError(f"a Query takes at most one of entry, like and label, got {' and '.join(given)}")


def _check_signature(session: ort.InferenceSession, name: str, expected: dict[str, tuple]) -> None:
    """The model's declared inputs/outputs must have the shapes the manifest implies (the batch
    axis is free), so a manifest that disagrees with its models is refused at open."""
    declared = {v.name: v.shape for v in list(session.get_inputs()) + list(session.get_outputs())}
    for io_name, shape in expected.items():
        if io_name not in declared:
            continue
        got = declared[io_name]
        if len(got) != len(shape) or any(isinstance(g, int) and g != w for g, w in zip(got[1:], shape[1:])):
            raise BundleError(f"the bundle's {name} expects {io_name} of shape {got}, the manifest implies {shape}")


def _run(session: ort.InferenceSession, name: str, outputs: list[str], feeds: dict) -> list[np.ndarray]:
    try:
        return session.run(outputs, feeds)
    except Exception as e:   # a model that loads but cannot run on manifest-shaped inputs
        raise BundleError(f"the bundle's {name} failed: {workers.first_line(e)}") from None


class Generator:
    """A loaded bundle that generates images. Use `Generator.open(...)`."""

    def __init__(self, bundle: Bundle, spec: Spec, threads: int | None, plan: budget.Plan):
        self.bundle, self.spec, self.threads, self.plan = bundle, spec, threads, plan
        start = time.perf_counter()
        budget.release_code_pages()         # library code the imports ran once, before the sessions add theirs
        self.denoiser = workers.session(bundle, "denoiser.onnx")
        build_s = time.perf_counter() - start      # about what a further one costs (`_another_denoiser`)
        # The exporter drops inputs a model ignores (pos when there is one block position).
        self._denoiser_inputs = {i.name for i in self.denoiser.get_inputs()}
        self.decoder = workers.session(bundle, "decoder.onnx")
        if bool(spec.border) != ("window" in self._denoiser_inputs):
            raise BundleError(f"the bundle's denoiser {'takes' if spec.border == 0 else 'takes no'} window input, "
                              f"but the manifest says denoiser.border = {spec.border}")
        rows = self.denoiser.get_modelmeta().custom_metadata_map.get(ROWS_PER_ITEM, "1")
        if rows != str(spec.rows_per_item):
            raise BundleError(f"the bundle's denoiser takes {rows} rows per item, but the manifest says "
                              f"denoiser.cross_block = {str(spec.cross_block).lower()} for {spec.positions} blocks")
        c, s, z, w = spec.latent_channels, spec.block_side, spec.latent_side, spec.window_side
        _check_signature(self.denoiser, "denoiser", {"x": (None, c, s, s), "cond": (None, spec.k * c, s, s),
                                                     "window": (None, c, w, w), "eps": (None, c, s, s)})
        _check_signature(self.decoder, "decoder", {"latent": (None, c, z, z),
                                                   "image": (None, spec.image_channels, spec.image_size,
                                                             spec.image_size)})
        if spec.k and "cond" not in self._denoiser_inputs:
            raise BundleError("the bundle's denoiser takes no neighbours, but the manifest says k > 0")
        self._cost = workers.probe(self.denoiser, spec, self._denoiser_inputs)   # chooses thread plans
        # A session per worker (2 workers on one session: each call about 10% dearer); a
        # further worker's session (`_another_denoiser`) is made when a forced --threads first
        # takes that worker, or once the default plan's groups have forgone savings worth
        # making it (`Sessions.worth_growing`).
        self._denoisers = workers.Sessions(lambda: self.denoiser, self._another_denoiser, build_s)
        self.last_workers = 1          # worker threads the last group's denoising took (bench reports it)
        self.encoder: ort.InferenceSession | None = None     # opened on the first --like query
        self.db = Database(bundle, spec)
        budget.release_free_memory()        # the members' bytes, parsed (each session trims its own)
        budget.release_code_pages()         # library code that making the sessions ran once
        self.alpha_bar = alphas_cumprod(spec.schedule, spec.timesteps, spec.beta_start, spec.beta_end)
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(cls, path: str | Path | Bundle | None = None, memory_budget: int | str | None = None,
             threads: int | None = None, trusted_keys: list[bytes] | None = None) -> "Generator":
        """Open a bundle (a .rissole path or a shipped name such as "twemoji"; default: the
        shipped default) within a memory budget
        (bytes, or a size such as "96MB"); refuses a budget the bundle cannot fit. With
        `trusted_keys` (Ed25519 public keys), refuses bundles not signed by one of them.
        `threads` None lets the plan choose, per group of images, how many cores to use from
        the work per denoiser call (workers.py; one thread for small calls); a number uses
        exactly that many worker threads."""
        budget_bytes = budget.parse_size(memory_budget) if isinstance(memory_budget, str) else memory_budget
        if threads is not None and not 1 <= threads <= 256:
            raise UsageError(f"threads must be between 1 and 256, got {threads}")
        if isinstance(path, Bundle):
            bundle = path
            if trusted_keys is not None and bundle.signer not in trusted_keys:
                raise BundleError("this bundle is not signed by a trusted key")
        else:
            bundle = Bundle.open(shipped.resolve(path), trusted_keys)
        spec = Spec.from_manifest(bundle.manifest)
        # Planned (and a budget too small refused) before anything is loaded.
        plan = budget.make_plan(budget_bytes, spec, budget.fixed(bundle), budget.passes(spec, spec.guidance),
                                threads or workers.cores(), budget.session_bytes(bundle))
        return cls(bundle, spec, threads, plan)

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the sessions and the database (their memory goes with them)."""
        with self._lock:
            self._closed = True
            self.denoiser = self.decoder = self.encoder = self.db = self._denoisers = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ generation

    def generate(self, n: int = 1, seed: int = 0, steps: int | None = None, sampler_name: str | None = None,
                 query: Query | None = None, guidance: float | None = None, on_progress: Progress | None = None,
                 as_array: bool = False, first_index: int = 0,
                 on_group: GroupDone | None = None, on_preview: PreviewFn | None = None,
                 preview_every: int | None = None, force_steps: bool = False,
                 collect: bool = True) -> list[Image.Image] | np.ndarray | None:
        """Generate images number first_index .. first_index + n - 1 of this seed.

        `guidance`, `steps` and `sampler_name` None use what the bundle recommends (its exporter
        measured what suits the model; `info` shows it); bundles that name none get guidance 1 and
        50 ddim steps. `sampler.SAMPLERS` lists the samplers.

        `on_preview(steps done, uint8 images (n, H, W, C))` receives the decoded x0 prediction of
        all n images every `preview_every` steps (default: about ten per run) and at the last.

        Images are made in groups (`plan.images_per_group`). As each group is decoded,
        `on_group(index of its first image, uint8 pixels (len, H, W, C))` gets it, so that a
        caller can save finished work before the rest is done (the CLI writes PNGs there, and an
        interrupt keeps them); then `on_progress(images done, n)` counts images. With `collect`
        False the images reach the caller only that way and None is returned, so that what is
        held does not grow with n (the CLI, unless it makes a grid).

        Image i depends only on (bundle, seed, i, settings, query): the same call gives the same
        pixels, and image i of a batch equals image i generated alone (first_index=i, n=1).

        A distilled bundle's student was made for one step count (ddim, guidance 1: its teacher's
        guidance is folded in); other settings are refused unless `force_steps`."""
        guidance = self.spec.guidance if guidance is None else guidance
        steps = self.spec.steps if steps is None else steps
        sampler_name = self.spec.sampler if sampler_name is None else sampler_name
        self._check(n, steps, sampler_name, guidance, seed)
        if self.spec.distilled_steps and not force_steps \
                and (steps, sampler_name, guidance) != (self.spec.distilled_steps, "ddim", 1.0):
            raise UsageError(f"this bundle is distilled for {self.spec.distilled_steps} ddim steps at guidance 1 "
                             f"(asked: {steps} {sampler_name} steps at guidance {guidance:g}): use "
                             f"--steps {self.spec.distilled_steps} --sampler ddim, or --force-steps to run it anyway")
        if preview_every is not None and (not isinstance(preview_every, int) or preview_every < 1):
            raise UsageError(f"preview_every must be a positive number of steps, got {preview_every}")
        if not isinstance(first_index, int) or not 0 <= first_index < 2 ** 62:
            raise UsageError(f"first_index must be a non-negative integer, got {first_index}")
        query = query or Query()
        with self._lock:
            if self._closed:
                raise UsageError("this Generator is closed")
            # Images go through in groups so that what is held per image stays bounded too.
            size = self.plan.images_per_group
            groups = [list(range(a, min(a + size, first_index + n))) for a in range(first_index, first_index + n, size)]
            pixels = np.empty((n, self.spec.image_size, self.spec.image_size, self.spec.image_channels),
                              np.uint8) if collect else None
            preview = None if on_preview is None else Preview(
                on_preview, preview_every or default_every(steps), steps, first_index,
                (n, self.spec.positions, self.spec.latent_channels, self.spec.block_side, self.spec.block_side),
                self._decode)
            for ids in groups:
                cond = self._conditions(ids, seed, query)
                latents, threads = self._denoise(ids, seed, steps, sampler_name, cond, guidance, preview)
                self.last_workers = threads
                start = ids[0] - first_index
                done = self._decode(latents, threads)
                if pixels is not None:
                    pixels[start:start + len(ids)] = done
                if on_group is not None:
                    on_group(ids[0], done)
                if on_progress is not None:
                    on_progress(start + len(ids), n)
        if pixels is None:
            return None
        return pixels if as_array else [to_pil(p) for p in pixels]

    def _check(self, n: int, steps: int, sampler_name: str, guidance: float, seed: int) -> None:
        check_count(n)
        if not isinstance(steps, int) or not 1 <= steps <= self.spec.timesteps:
            raise UsageError(f"steps must be between 1 and {self.spec.timesteps}, got {steps}")
        if sampler_name not in sampler.SAMPLERS:
            raise UsageError(f"unknown sampler {sampler_name!r}; choose {sampler.names()}")
        check_guidance(guidance)
        if not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise UsageError(f"seed must be a non-negative integer, got {seed}")

    def _conditions(self, ids: list[int], seed: int, query: Query) -> np.ndarray | None:
        """Neighbour blocks per image: (n, P, k*C, s, s), or None for a bundle without retrieval."""
        n = len(ids)
        spec = self.spec
        if spec.k == 0:
            return None
        label = self.db.label_id(query.label) if query.label is not None else None
        if query.entry is not None and not 0 <= query.entry < spec.images:
            raise UsageError(f"query id must be between 0 and {spec.images - 1}, got {query.entry}")
        like_key = like_codes = None
        if query.like is not None:
            like_key, like_codes = self._encode_query(query.like)
        found = []
        for i in ids:
            if like_key is not None:
                found.append(self.db.neighbours(like_key, like_codes, rng.neighbour_rng(seed, i), label))
            else:
                entry = query.entry if query.entry is not None else \
                    self.db.random_entry(rng.query_rng(seed, i), label)
                found.append(self.db.entry_neighbours(entry, rng.neighbour_rng(seed, i), label))
        nb = self.db.blocks(np.concatenate(found))                     # (n*k, P, C, s, s), in one gather
        s = spec.block_side
        return nb.reshape(n, spec.k, spec.positions, -1, s, s).transpose(0, 2, 1, 3, 4, 5).reshape(
            n, spec.positions, -1, s, s)

    def encoder_session(self) -> ort.InferenceSession:
        """The bundle's encoder (image -> latent snapped to codes, codes), opened on first use:
        only queries by image and evaluation need it, so plain generation never pays for it."""
        if "encoder.onnx" not in self.bundle.members:
            raise UsageError("this bundle has no encoder, so it cannot search by image")
        if self.encoder is None:
            self.encoder = workers.session(self.bundle, "encoder.onnx")
        return self.encoder

    def _another_denoiser(self) -> ort.InferenceSession:
        """One more denoiser session, for one more worker. Building it pages in onnxruntime's
        graph code again: the library pages that generation paged in are dropped before it and
        those it paged in after, as `__init__` does (`budget.release_code_pages`), so that the
        process's peak grows by about the session alone."""
        budget.release_code_pages()
        made = workers.session(self.bundle, "denoiser.onnx")
        budget.release_code_pages()
        return made

    def _encode_query(self, like: str | Path | Image.Image) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        encoder = self.encoder_session()
        if not isinstance(like, Image.Image):
            try:
                with Image.open(like) as im:
                    im.load()
                    like = im.copy()
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot read image {like}: {e}") from None
        try:
            pixels = fit(like, self.spec.image_size, self.spec.image_channels,
                         self.bundle.manifest["image"].get("background", "#ffffff"))
        except (ValueError, TypeError, OverflowError):
            raise BundleError("bundle manifest field image.background is not a colour") from None
        x = from_uint8(pixels[None])
        latent, codes = _run(encoder, "encoder", ["latent", "codes"], {"image": x})
        own = blocks.split(codes[:, None].astype(self.db.codes.dtype), self.spec.blocks_per_side)[0, :, 0]
        return self.db.key_of_latent(latent[0]), own

    def _denoise(self, ids: list[int], seed: int, steps: int, sampler_name: str, cond: np.ndarray | None,
                 guidance: float, preview: Preview | None = None) -> tuple[np.ndarray, int]:
        """All n*P blocks, in chunks of at most `plan.blocks_per_call`, each chunk run through
        every step; the thread plan (workers.py) says how many threads take chunks and how big.
        Work items are (row, position); row r is image number ids[r]. A border-conditioned
        denoiser's chunks hold whole images (`spec.blocks_together` blocks, in position order), so
        that each block's window is cut from its own image's current x_t. Returns the latents and
        the number of threads the plan used."""
        spec = self.spec
        shape = (spec.positions, spec.latent_channels, spec.block_side, spec.block_side)
        work = [(r, p) for r in range(len(ids)) for p in range(spec.positions)]
        # A plan made for unguided calls holds half as many guided blocks (two rows each).
        passes = budget.passes(self.spec, guidance)
        together = spec.blocks_together
        chunk = max(together, self.plan.blocks_per_call * self.plan.passes // passes // together * together)
        out = np.empty((len(ids),) + shape, np.float32)

        def run_chunk(items: list[tuple[int, int]]) -> None:
            with self._denoisers.take() as denoiser:
                denoise_chunk(items, denoiser)

        def denoise_chunk(items: list[tuple[int, int]], denoiser: ort.InferenceSession) -> None:
            img = np.array([i for i, _ in items])
            pos = np.array([p for _, p in items], dtype=np.int64)
            x = _blocks_of_images(lambda r: rng.initial_noise(seed, ids[r], shape), img, pos)
            c = cond[img, pos] if cond is not None else None

            guided = c is not None and guidance != 1.0
            both_pos = np.concatenate([pos, pos]) if guided else pos
            both_c = np.concatenate([c, np.zeros_like(c)]) if guided else c

            def eps_fn(xt: np.ndarray, t: np.ndarray) -> np.ndarray:
                window = blocks.row_windows(xt, spec.blocks_per_side, spec.border) if spec.border else None
                if guided:     # conditional and unconditional rows in one call, split after
                    xt, t = np.concatenate([xt, xt]), np.concatenate([t, t])
                    window = None if window is None else np.concatenate([window, window])
                feeds = {"x": xt, "t": t, "pos": both_pos, "cond": both_c, "window": window}
                eps = _run(denoiser, "denoiser", ["eps"],
                           {k: v for k, v in feeds.items() if k in self._denoiser_inputs})[0]
                if guided:
                    eps, uncond = eps[:len(eps) // 2], eps[len(eps) // 2:]
                    eps = uncond + guidance * (eps - uncond)
                return eps

            def noise_fn(step: int) -> np.ndarray:
                return _blocks_of_images(lambda r: rng.step_noise(seed, ids[r], step, shape), img, pos)

            numbers = np.array([ids[r] for r in img])
            on_step = None if preview is None else \
                (lambda step, x0, numbers=numbers, pos=pos: preview.update(numbers, pos, step, x0))
            x = sampler.sample(eps_fn, x, self.alpha_bar, steps, sampler_name, noise_fn, on_step)
            out[img, pos] = x

        units, in_flight = len(work) // together, chunk // together     # the plan counts `together` blocks

        def call_ms(n: int) -> float:       # one thread's call of n units: passes * together rows each
            return self._cost.ms(n * passes * together)

        plan = workers.choose(units, in_flight, call_ms, self.threads, self.plan.sessions)
        one = workers.denoise_s(units, in_flight, call_ms, steps)
        if self.threads is None and not self._denoisers.worth_growing(
                plan.workers, one - workers.denoise_s(units, in_flight, call_ms, steps, plan.workers)):
            plan = workers.choose(units, in_flight, call_ms, None, len(self._denoisers))   # the sessions there are
        self._denoisers.grow(plan.workers)
        per_call = plan.per_call * together
        workers.run(run_chunk, [work[a:a + per_call] for a in range(0, len(work), per_call)], plan.workers,
                    (one, workers.denoise_s(units, in_flight, call_ms, steps, plan.workers)))
        return out, plan.workers

    def _decode(self, latents: np.ndarray, threads: int = 1) -> np.ndarray:
        """(n, P, C, s, s) blocks -> uint8 images, on up to `threads` threads (the denoiser's
        thread plan passes its own count: at 4 steps the decoder is a fifth of the work, and on
        one thread it would leave the second core idle). Under a memory budget the threads share
        the plan's `images_per_decode` images in flight; without one, each thread may hold that
        many (the denoiser's rows, freed by then, held far more)."""
        whole = blocks.join(latents, self.spec.blocks_per_side)
        out = np.empty((len(whole), self.spec.image_size, self.spec.image_size, self.spec.image_channels), np.uint8)
        per_call = self.plan.images_per_decode
        in_flight = per_call if self.plan.budget is not None else per_call * threads
        threads = max(1, min(threads, len(whole), in_flight))
        size = max(1, min(in_flight // threads, per_call, -(-len(whole) // threads)))

        def decode(start: int) -> None:
            z = np.ascontiguousarray(whole[start:start + size])
            out[start:start + size] = to_uint8(_run(self.decoder, "decoder", ["image"], {"latent": z})[0])

        workers.run(decode, range(0, len(whole), size), threads)
        return out


def _blocks_of_images(draw: Callable[[int], np.ndarray], rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Blocks (rows[j], pos[j]) of per-image draws, `draw(row)` -> (P, C, s, s): each image's
    noise is drawn once per chunk, not once per block (a draw is a fresh generator, ~10 us, and
    a chunk holds up to P blocks of an image)."""
    order, inverse = np.unique(rows, return_inverse=True)
    return np.stack([draw(int(r)) for r in order])[inverse, pos]


def check_count(n: int) -> None:
    """Refuse an image count outside 1..MAX_IMAGES: the CLI calls it before it plans any output
    file (a huge -n would otherwise build that many paths first), the API before any work."""
    if not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
        raise UsageError(f"number of images must be between 1 and {MAX_IMAGES}, got {n}")
