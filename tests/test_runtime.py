"""The torch-free runtime: determinism, batching, threads, budget, samplers, bad input."""

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from rissole_edge import sampler as np_sampler
from rissole_edge.errors import UsageError
from rissole_edge.generator import Generator, Query
from rissole_edge.schedule import alphas_cumprod
from rissole_export.diffusion import Diffusion
from rissole_export.sampling import RunModels

from conftest import SAMPLE, cli


@pytest.fixture(scope="module")
def gen(tiny_bundle):
    with Generator.open(tiny_bundle, threads=1) as g:
        yield g


def test_same_seed_same_pixels_and_seeds_differ(tiny_bundle, gen):
    a = gen.generate(3, seed=5, steps=10, as_array=True)
    with Generator.open(tiny_bundle, threads=2) as other:
        b = other.generate(3, seed=5, steps=10, as_array=True)
    with Generator.open(tiny_bundle) as planned:
        c = planned.generate(3, seed=5, steps=10, as_array=True)
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert not np.array_equal(a, gen.generate(3, seed=6, steps=10, as_array=True))


@pytest.mark.parametrize("sampler_name", list(np_sampler.SAMPLERS))
def test_image_i_of_a_batch_equals_it_alone(tiny_bundle, gen, sampler_name):
    """For every registered sampler, alone or in a batch, with 1 or 2 threads."""
    batch = gen.generate(4, seed=3, steps=8, sampler_name=sampler_name, as_array=True)
    with Generator.open(tiny_bundle, threads=2) as two:
        assert np.array_equal(batch, two.generate(4, seed=3, steps=8, sampler_name=sampler_name, as_array=True))
    for i in range(4):
        alone = gen.generate(1, seed=3, steps=8, sampler_name=sampler_name, first_index=i, as_array=True)
        assert np.array_equal(batch[i], alone[0]), i



@pytest.mark.parametrize("name", ["tiny", "fashion-mnist", "twemoji", "twemoji-teacher"])
def test_a_denoiser_row_does_not_depend_on_its_batch(tiny_bundle, name):
    """Thread plans cut a group's blocks into chunks of any size (of whole images, for a graph
    whose blocks attend to each other): that is only allowed because onnxruntime's kernels
    (int8 and fp32) give each row the same result whatever else is in the batch."""
    import onnxruntime as ort

    from rissole_edge import workers
    from rissole_edge.bundle import Bundle, Spec
    from rissole_edge.shipped import resolve

    bundle = Bundle.open(tiny_bundle if name == "tiny" else resolve(name))
    spec = Spec.from_manifest(bundle.manifest)
    unit = spec.rows_per_item       # a cross-block graph (twemoji-teacher) takes whole images: rows of items
    rows = 37 * unit
    session = workers.session(bundle, "denoiser.onnx")
    r = np.random.default_rng(0)
    feeds = {k: r.standard_normal(v.shape).astype(np.float32) for k, v in
             workers.dummy_feeds(spec, rows, {i.name for i in session.get_inputs()}).items()
             if k in ("x", "cond", "window")}
    feeds["t"] = r.integers(0, spec.timesteps, rows).astype(np.float32)
    if "pos" in {i.name for i in session.get_inputs()}:
        feeds["pos"] = r.integers(0, spec.positions, rows)
    whole = session.run(["eps"], feeds)[0]
    for size in (unit, 5 * unit, 16 * unit):
        parts = [session.run(["eps"], {k: v[a:a + size] for k, v in feeds.items()})[0] for a in range(0, rows, size)]
        assert np.array_equal(whole, np.concatenate(parts)), size
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    threaded = ort.InferenceSession(bundle.read("denoiser.onnx"), options, providers=["CPUExecutionProvider"])
    assert np.array_equal(whole, threaded.run(["eps"], feeds)[0])


@pytest.mark.parametrize("name", ["tiny", "fashion-mnist", "twemoji"])
def test_a_decoded_image_does_not_depend_on_its_batch(tiny_bundle, name):
    """Decoder calls take as many images as the threads and the memory plan give them: allowed
    because each image decodes to the same pixels whatever the call holds."""
    from rissole_edge import workers
    from rissole_edge.bundle import Bundle, Spec
    from rissole_edge.shipped import resolve

    bundle = Bundle.open(tiny_bundle if name == "tiny" else resolve(name))
    spec = Spec.from_manifest(bundle.manifest)
    session = workers.session(bundle, "decoder.onnx")
    z = np.random.default_rng(1).standard_normal((7, spec.latent_channels, spec.latent_side, spec.latent_side))
    z = (z * spec.latent_scale).astype(np.float32)
    whole = session.run(["image"], {"latent": z})[0]
    for size in (1, 3):
        parts = [session.run(["image"], {"latent": z[a:a + size]})[0] for a in range(0, len(z), size)]
        assert np.array_equal(whole, np.concatenate(parts)), size


def test_every_thread_plan_gives_the_same_pixels(tiny_bundle, gen):
    """1, 2 and 3 worker threads and the plan's own choice cut the blocks into different
    chunks (3 workers: chunks of 7, 7 and 6 blocks for 5 images); guidance doubles the rows."""
    for guidance in (1.0, 2.0):
        expected = gen.generate(5, seed=4, steps=6, guidance=guidance, as_array=True)
        for threads in (2, 3, None):
            with Generator.open(tiny_bundle, threads=threads) as other:
                got = other.generate(5, seed=4, steps=6, guidance=guidance, as_array=True)
            assert np.array_equal(expected, got), (guidance, threads)


def _generate_under_budget(bundle, budget, out):
    proc = cli("generate", "-m", str(bundle), "-n", "3", "--steps", "6", "--seed", "9", "--memory-budget", budget,
               "-o", str(out), "--json", "--threads", "1", check=True)
    report = json.loads(proc.stdout)
    return report, np.stack([np.asarray(Image.open(p), dtype=int) for p in report["images"]])


def test_a_budget_without_a_unit_is_refused_as_bytes_not_rounded_up(tiny_bundle, tmp_path):
    """`--memory-budget 60` is 60 bytes; the refusal must say so, not print it as "1MB"."""
    refusal = _error(cli("generate", "-m", str(tiny_bundle), "--memory-budget", "60", "-o", str(tmp_path / "x")))
    assert "memory budget 60 bytes" in refusal and "did you mean 60MB?" in refusal
    refusal = _error(cli("generate", "-m", str(tiny_bundle), "--memory-budget", "20.5MB", "-o", str(tmp_path / "x")))
    assert "memory budget 20.5MB is below" in refusal


def test_budgets_are_honoured_and_refused_below_the_minimum(tiny_bundle, tmp_path):
    """Each run is its own process: the budget is about the whole process's peak RSS."""
    refusal = _error(cli("generate", "-m", str(tiny_bundle), "--memory-budget", "20MB", "-o", str(tmp_path / "x")))
    assert "below what this bundle needs: at least" in refusal and not (tmp_path / "x").exists()
    minimum = int(refusal.split("at least ")[1].rstrip("MB")) + 2
    small, a = _generate_under_budget(tiny_bundle, f"{minimum}MB", tmp_path / "small")
    large, b = _generate_under_budget(tiny_bundle, "512MB", tmp_path / "large")
    assert small["peak_rss_mb"] <= minimum and large["peak_rss_mb"] <= 512
    assert int(small["plan"].split()[0]) < int(large["plan"].split()[0])
    assert np.abs(a - b).max() <= 1          # batching changes float summation order only


def test_four_threads_share_one_generator(gen):
    serial = [gen.generate(2, seed=s, steps=5, as_array=True) for s in range(8)]
    results = [None] * 8

    def work(s):
        results[s] = gen.generate(2, seed=s, steps=5, as_array=True)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads[:4]:
        t.start()
    for t in threads[4:]:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(a, b) for a, b in zip(serial, results))


def test_queries_by_id_label_and_image(gen):
    by_id = gen.generate(2, seed=0, steps=4, query=Query(entry=7), as_array=True)
    assert by_id.shape[0] == 2
    like = Image.open(next((SAMPLE / "bag").iterdir()))
    assert gen.generate(1, seed=0, steps=4, query=Query(like=like))[0].size == (16, 16)
    with pytest.raises(UsageError, match="unknown label"):
        gen.generate(1, query=Query(label="hat"))
    with pytest.raises(UsageError, match="query id"):
        gen.generate(1, query=Query(entry=10 ** 6))


def test_numpy_samplers_match_the_torch_samplers(tiny_run):
    """The same network and the same noise through both samplers (torch reference, numpy runtime)."""
    m = RunModels.load(tiny_run)
    net = m.net
    torch.manual_seed(0)
    shape = (6, net.latent_channels, net.block_size, net.block_size)
    x = torch.randn(shape)
    pos = torch.arange(6) % net.positions
    cond = torch.randn(6, net.k * net.latent_channels, net.block_size, net.block_size)
    noises = [torch.randn(shape) for _ in range(30)]
    for name, steps in [(name, steps) for name in np_sampler.SAMPLERS for steps in (3, 20)] + [("ddpm", 30)]:
        ref = Diffusion("linear", 1000).sample(lambda xt, t: net(xt, t, pos, cond), x, steps, name,
                                               lambda i: noises[i])

        def eps_np(xt, t):
            with torch.no_grad():
                return net(torch.from_numpy(xt), torch.from_numpy(t), pos, cond).numpy()

        out = np_sampler.sample(eps_np, x.numpy(), alphas_cumprod("linear", 1000), steps, name,
                                lambda i: noises[i].numpy())
        assert np.allclose(out, ref.numpy(), rtol=1e-5, atol=1e-4), (name, steps)   # float32 rounding


def test_torch_is_never_imported_by_generation(tiny_bundle, tmp_path):
    code = (
        "import sys, rissole_edge.cli as c\n"
        f"sys.argv = ['rissole-edge', 'generate', '-m', r'{tiny_bundle}', '-n', '2', '--steps', '3', "
        f"'-o', r'{tmp_path}']\n"
        "try:\n    c.main()\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, any(m.startswith('rissole_export') for m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"
    assert len(list(tmp_path.glob("*.png"))) == 2


def _error(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_generate_bad_inputs(tiny_bundle, tmp_path):
    out = tmp_path / "out"
    base = ["generate", "-m", str(tiny_bundle), "-o", str(out)]
    assert "not found" in _error(cli("generate", "-m", str(tmp_path / "none.rissole"), "-o", str(out)))
    (tmp_path / "corrupt.rissole").write_bytes(b"RISSOLE\0garbage")
    _error(cli("generate", "-m", str(tmp_path / "corrupt.rissole"), "-o", str(out)))
    assert "number of images" in _error(cli(*base, "-n", "0"))
    assert "number of images" in _error(cli(*base, "-n", "100000000"))
    assert "steps" in _error(cli(*base, "--steps", "0"))
    assert "steps" in _error(cli(*base, "--steps", "5000"))
    assert "at least" in _error(cli(*base, "--memory-budget", "10MB"))
    assert "memory size" in _error(cli(*base, "--memory-budget", "lots"))
    assert "unknown label" in _error(cli(*base, "--label", "hat"))
    (tmp_path / "bad.png").write_bytes(b"no png")
    assert "cannot read image" in _error(cli(*base, "--like", str(tmp_path / "bad.png")))
    assert "at most one" in _error(cli(*base, "--like", str(tmp_path / "bad.png"), "--label", "bag"))
    (tmp_path / "file").write_text("x")
    assert "cannot write" in _error(cli("generate", "-m", str(tiny_bundle), "-o", str(tmp_path / "file" / "sub")))
    assert not out.exists()


def test_generate_writes_pngs_grid_and_json(tiny_bundle, tmp_path):
    proc = cli("generate", "-m", str(tiny_bundle), "-n", "3", "--steps", "5", "-o", str(tmp_path / "o"),
               "--grid", str(tmp_path / "grid.png"), "--json", check=True)
    report = json.loads(proc.stdout)
    assert len(report["images"]) == 3 and Image.open(tmp_path / "grid.png").size == (32, 32)
    assert report["peak_rss_mb"] > 0 and report["per_image_s"] > 0


def test_closed_generator_refuses_work(tiny_bundle):
    g = Generator.open(tiny_bundle)
    g.close()
    with pytest.raises(UsageError, match="closed"):
        g.generate(1)


def test_without_a_model_the_default_bundle_is_used_or_its_absence_explained(tmp_path):
    from rissole_edge.shipped import default_bundle
    proc = cli("generate", "-n", "1", "--steps", "2", "-o", str(tmp_path / "o"))
    try:
        default_bundle()
    except UsageError:
        assert proc.returncode == 2 and "no default bundle is installed" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr


def test_bench_quick_smoke(tiny_bundle):
    """The benchmark must never rot: a seconds-long run in CI, figures present and sane."""
    results = json.loads(cli("bench", "-m", str(tiny_bundle), "--quick", "--json", check=True).stdout)
    assert [r["config"]["threads"] for r in results["configs"]] == [None, 1, 2]
    for r in results["configs"]:
        assert "error" not in r, r
        assert 0 < r["open_s"] < r["cold_s"] and r["warm_image_s"] > 0 and r["batched_images_per_s"] > 0
        assert r["peak_rss_mb"] > 20 and r["warm_image_cpu_s"] > 0
    plans = results["plans"]
    assert "error" not in plans, plans
    for kind, options in (("generate_ms_per_image", {"1 thread", "2 threads", "default"}),
                          ("calls_ms", {"1 thread", "2 intra-op threads", "2 workers on halves"})):
        for row in plans[kind].values():
            assert set(row["median"]) == options and row["fastest"] in options
            assert all(v > 0 for v in row["median"].values())
    for row in plans["generate_ms_per_image"].values():     # the tiny model's calls are too small to split
        assert set(row["default_workers"]) == {1} and row["default_is"] == "1 thread"
        assert isinstance(row["default_is_fastest"], bool) and row["default_vs_the_other_plan"] > 0
        assert set(row["cpu_median"]) == set(row["median"]) and all(v > 0 for v in row["cpu_median"].values())


@pytest.mark.parametrize("name,extra,size,mode", [
    ("fashion-mnist", ["--label", "sneaker", "--steps", "10"], 32, "L"),
    ("twemoji", ["--label", "food-drink"], 64, "RGB"),                  # the 4-step student: its own steps
    ("twemoji-teacher", ["--label", "food-drink", "--steps", "10"], 64, "RGB")])
def test_shipped_bundles_verify_and_generate(tmp_path, name, extra, size, mode):
    """CI never trains the shipped models; it checks that they verify and generate."""
    from rissole_edge.shipped import shipped_bundle
    bundle = shipped_bundle(name)
    assert cli("verify", str(bundle)).returncode == 0
    report = json.loads(cli("generate", "-m", name, *extra, "-n", "2",
                            "-o", str(tmp_path), "--json", check=True).stdout)
    image = Image.open(report["images"][0])
    assert len(report["images"]) == 2 and image.size == (size, size) and image.mode == mode
    assert np.asarray(image).std() > 5          # a picture, not a flat or blank square


def test_the_bundle_recommended_guidance_is_the_default_and_can_be_overridden(tiny_bundle):
    from rissole_edge.bundle import Bundle, BundleError
    source = Bundle.open(tiny_bundle)
    manifest = {k: v for k, v in source.manifest.items() if k not in ("members", "sampling")}
    data = {name: source.read(name) for name in source.members}
    with Generator.open(Bundle.in_memory(manifest, data)) as gen:
        assert gen.spec.guidance == 1.0                    # bundles that name none: plain conditioning
    recommended = Bundle.in_memory({**manifest, "sampling": {"guidance": 3.0}}, data)
    with Generator.open(recommended) as gen:
        default = gen.generate(2, seed=5, steps=4, as_array=True)
        assert np.array_equal(default, gen.generate(2, seed=5, steps=4, guidance=3.0, as_array=True))
        assert not np.array_equal(default, gen.generate(2, seed=5, steps=4, guidance=1.0, as_array=True))
    with pytest.raises(BundleError, match="sampling.guidance"):
        Generator.open(Bundle.in_memory({**manifest, "sampling": {"guidance": 99}}, data))
