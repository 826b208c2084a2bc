"""The runtime's sampling options: the sampler registry at the API and CLI, guidance in one
denoiser call, the bundle's recommended sampler and step count, and previews."""

import json

import numpy as np
import pytest
from PIL import Image

from rissole_edge import sampler as np_sampler
from rissole_edge.bundle import Bundle, BundleError
from rissole_edge.errors import UsageError
from rissole_edge.generator import Generator

from conftest import cli


def _with_sampling(bundle_path, sampling):
    """The bundle at `bundle_path` in memory, with its manifest's sampling table replaced."""
    source = Bundle.open(bundle_path)
    manifest = {k: v for k, v in source.manifest.items() if k not in ("members", "sampling")}
    if sampling is not None:
        manifest["sampling"] = sampling
    return Bundle.in_memory(manifest, {name: source.read(name) for name in source.members})


class _Counting:
    """Wraps the denoiser session: counts calls and their batch rows; `split` runs each call as
    two halves, i.e. the old two-call guidance."""

    def __init__(self, session, split=False):
        self.session, self.split, self.rows = session, split, []

    def run(self, outputs, feeds):
        self.rows.append(len(feeds["x"]))
        if not self.split:
            return self.session.run(outputs, feeds)
        half = len(feeds["x"]) // 2
        parts = [self.session.run(outputs, {k: v[s] for k, v in feeds.items()})[0]
                 for s in (slice(0, half), slice(half, None))]
        return [np.concatenate(parts)]


def test_guidance_is_one_denoiser_call_per_step(tiny_bundle):
    with Generator.open(tiny_bundle, threads=1) as gen:
        blocks = 2 * gen.spec.positions
        real = gen.denoiser
        gen.denoiser = counting = _Counting(real)
        guided = gen.generate(2, seed=1, steps=5, guidance=3.0, as_array=True)
        assert counting.rows == [2 * blocks] * 5              # cond and uncond rows together
        gen.denoiser = counting = _Counting(real)
        gen.generate(2, seed=1, steps=5, guidance=1.0, as_array=True)
        assert counting.rows == [blocks] * 5
        gen.denoiser = _Counting(real, split=True)            # the same maths in two calls per step
        two_calls = gen.generate(2, seed=1, steps=5, guidance=3.0, as_array=True)
        gen.denoiser = real
    assert np.abs(guided.astype(int) - two_calls.astype(int)).max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("sampler_name", ["ddim", "dpmpp-3m"])
def test_guided_image_i_is_the_same_alone_in_a_batch_and_at_any_thread_count(sampler_name):
    """twemoji-teacher records guidance 4: a guided call mixes the images' cond and uncond rows
    (whole images: its blocks attend to each other), and onnxruntime must still give each row
    the same result whatever else is in the call."""
    from rissole_edge.shipped import resolve
    teacher = resolve("twemoji-teacher")       # `twemoji` itself is a student with guidance folded in
    with Generator.open(teacher, threads=1) as one, Generator.open(teacher, threads=2) as two:
        assert one.spec.guidance != 1.0
        batch = one.generate(3, seed=4, steps=3, sampler_name=sampler_name, as_array=True)
        assert np.array_equal(batch, two.generate(3, seed=4, steps=3, sampler_name=sampler_name, as_array=True))
        for i in range(3):
            alone = two.generate(1, seed=4, steps=3, sampler_name=sampler_name, first_index=i, as_array=True)
            assert np.array_equal(batch[i], alone[0]), i


def test_the_planner_counts_both_guidance_rows(tiny_bundle):
    from rissole_edge import budget
    from rissole_edge.bundle import Bundle, Spec
    spec = Spec.from_manifest(Bundle.open(tiny_bundle).manifest)
    plain = budget.make_plan(None, spec, 0)
    guided = budget.make_plan(None, spec, 0, passes=2)
    assert guided.blocks_per_call * 2 == plain.blocks_per_call and guided.passes == 2
    with Generator.open(_with_sampling(tiny_bundle, {"guidance": 2.0})) as gen:
        assert gen.plan.passes == (2 if gen.spec.k else 1)


def test_the_bundle_recommended_sampler_and_steps_are_the_default(tiny_bundle, monkeypatch):
    with Generator.open(_with_sampling(tiny_bundle, None), threads=1) as old:
        assert (old.spec.sampler, old.spec.steps, old.spec.guidance) == ("ddim", 50, 1.0)
    bundle = _with_sampling(tiny_bundle, {"guidance": 1.0, "sampler": "dpmpp-2m", "steps": 6})
    used = []
    registered = np_sampler.SAMPLERS["dpmpp-2m"]
    monkeypatch.setitem(np_sampler.SAMPLERS, "dpmpp-2m", np_sampler.Sampler(
        lambda eps_fn, x, *rest: (used.append(len(rest[1])), registered.run(eps_fn, x, *rest))[1], registered.about))
    with Generator.open(bundle, threads=1) as gen:
        default = gen.generate(2, seed=3, as_array=True)
        assert used and set(used) == {6}                  # the recommended sampler ran, over 6 timesteps
        assert np.array_equal(default, gen.generate(2, seed=3, steps=6, sampler_name="dpmpp-2m", as_array=True))
        assert gen.spec.sampler == "dpmpp-2m" and gen.spec.steps == 6
        assert not np.array_equal(default, gen.generate(2, seed=3, steps=2, as_array=True))   # steps honoured


@pytest.mark.parametrize("sampling,field", [
    ({"sampler": "euler"}, "sampling.sampler"), ({"sampler": 3}, "sampling.sampler"),
    ({"steps": 0}, "sampling.steps"), ({"steps": 2.5}, "sampling.steps"), ({"steps": True}, "sampling.steps"),
    ({"steps": 1001}, "sampling.steps"), ({"steps": "4"}, "sampling.steps"), ("fast", "sampling"),
])
def test_malformed_recommended_sampling_is_refused_at_open(tiny_bundle, sampling, field):
    with pytest.raises(BundleError, match=field) as e:
        Generator.open(_with_sampling(tiny_bundle, sampling))
    assert "\n" not in str(e.value)


def test_unknown_sampler_exits_2_naming_the_registered_ones(tiny_bundle, tmp_path):
    proc = cli("generate", "-m", str(tiny_bundle), "--sampler", "euler", "-o", str(tmp_path / "o"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert all(name in proc.stderr for name in np_sampler.SAMPLERS) and not (tmp_path / "o").exists()
    help_text = cli("generate", "--help").stdout
    assert all(name in help_text for name in np_sampler.SAMPLERS)


def test_info_shows_the_recommended_sampling(tiny_bundle):
    assert "sampling    ddim, 50 steps" in cli("info", str(tiny_bundle), check=True).stdout


def test_previews_are_the_decoded_x0_every_k_steps(tiny_bundle):
    seen, every_third = [], []
    with Generator.open(tiny_bundle, threads=1) as gen:
        final = gen.generate(3, seed=2, steps=7, sampler_name="dpmpp-2m", as_array=True,
                             on_preview=lambda step, images: seen.append((step, images.copy())), preview_every=1)
        gen.generate(3, seed=2, steps=7, sampler_name="dpmpp-2m", as_array=True,
                     on_preview=lambda step, images: every_third.append(step), preview_every=3)
        with pytest.raises(UsageError, match="preview_every"):
            gen.generate(1, steps=2, on_preview=lambda *a: None, preview_every=0)
    assert [step for step, _ in seen] == list(range(1, 8)) and every_third == [3, 6, 7]
    assert all(images.shape == final.shape and images.dtype == np.uint8 for _, images in seen)
    assert np.array_equal(seen[-1][1], final)                # the last x0 is the result
    assert not np.array_equal(seen[0][1], final)             # the first is a rough guess


def test_cli_preview_rewrites_one_grid(tiny_bundle, tmp_path):
    preview = tmp_path / "preview.png"
    report = json.loads(cli("generate", "-m", str(tiny_bundle), "-n", "4", "--steps", "4", "--preview", str(preview),
                            "--preview-every", "1", "--grid", str(tmp_path / "grid.png"), "-o", str(tmp_path / "o"),
                            "--json", check=True).stdout)
    assert len(report["images"]) == 4
    assert np.array_equal(np.asarray(Image.open(preview)), np.asarray(Image.open(tmp_path / "grid.png")))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []      # no temp file left
    proc = cli("generate", "-m", str(tiny_bundle), "--preview", str(tmp_path / "none" / "p.png"), "-o", str(tmp_path / "p"))
    assert proc.returncode == 2 and "cannot write the preview" in proc.stderr and not (tmp_path / "p").exists()


def test_set_sampling_repacks_a_bundle_with_new_recommendations(tiny_bundle, tmp_path):
    out = tmp_path / "retuned.rissole"
    proc = cli("set-sampling", str(tiny_bundle), "-o", str(out), "--sampler", "dpmpp-3m", "--steps", "5", check=True)
    assert "dpmpp-3m, 5 steps" in proc.stdout
    source, retuned = Bundle.open(tiny_bundle), Bundle.open(out)
    assert retuned.manifest["sampling"] == {**source.manifest["sampling"], "sampler": "dpmpp-3m", "steps": 5}
    assert all(retuned.read(name) == source.read(name) for name in source.members)
    with Generator.open(out, threads=1) as a, Generator.open(tiny_bundle, threads=1) as b:
        assert np.array_equal(a.generate(2, seed=1, as_array=True),
                              b.generate(2, seed=1, steps=5, sampler_name="dpmpp-3m", as_array=True))
    for bad, message in ((["--steps", "0"], "steps must be between"), (["--sampler", "euler"], "unknown sampler")):
        proc = cli("set-sampling", str(tiny_bundle), "-o", str(tmp_path / "bad.rissole"), *bad)
        assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "bad.rissole").exists()


def test_the_exporter_records_the_recommended_sampling(tiny_run, tiny_bundle, tmp_path):
    assert {"sampler", "steps", "guidance"} <= set(Bundle.open(tiny_bundle).manifest["sampling"])
    out = tmp_path / "fp32.rissole"
    cli("export", str(tiny_run), "-o", str(out), "--quantize", "fp32", "--sampler", "dpmpp-2m", "--steps", "9",
        check=True)
    assert Bundle.open(out).manifest["sampling"] == {"sampler": "dpmpp-2m", "steps": 9, "guidance": 1.0}
    proc = cli("export", str(tiny_run), "-o", str(tmp_path / "x.rissole"), "--sampler", "euler")
    assert proc.returncode == 2 and "unknown sampler" in proc.stderr and not (tmp_path / "x.rissole").exists()
