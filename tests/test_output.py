"""What a newcomer meets first: shipped names everywhere, files that are never overwritten
silently, normal permissions, grids padded with the model's own background, finished groups
kept on interrupt, and progress counted in images. On the shipped bundles: no training needed."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from typer.testing import CliRunner

from rissole_edge import images, shipped
from rissole_edge.bundle import BundleError
from rissole_edge.cli import app
from rissole_edge.errors import UsageError
from rissole_edge.generator import Generator
from rissole_edge.output import ImageWriter, _interrupts_deferred

from conftest import cli


def test_shipped_names_work_in_the_api_info_verify_and_help(tmp_path):
    assert shipped.names()[0] == "fashion-mnist" and "twemoji" in shipped.names()
    with Generator.open("twemoji", threads=1) as gen:
        assert gen.spec.image_size == 64
    assert cli("info", "twemoji").stdout.startswith("twemoji: rissole bundle")
    assert cli("verify", "twemoji").stdout.strip() == "twemoji: OK"
    runner = CliRunner()
    names = ", ".join(shipped.names())             # the default first, then the others
    for command in ("generate", "info", "verify", "bench"):
        text = runner.invoke(app, [command, "--help"], terminal_width=200).output
        assert names in re.sub(r"[\s│]+", " ", text), command
    with pytest.raises(BundleError, match=re.escape(f"shipped name ({names})")):
        Generator.open("fashion")
    (tmp_path / "twemoji").write_bytes(b"not a bundle")        # a user's own file wins over the name
    with pytest.raises(BundleError, match="not a rissole bundle"):
        Generator.open(tmp_path / "twemoji")


def test_the_readme_python_snippet_runs_as_written():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    lines = []
    scope = {"print": lambda *a: lines.append(a)}
    exec(snippet, scope)
    assert len(scope["images"]) == 8 and lines[-1] == ("8/8 images",)


def test_generate_refuses_to_overwrite_unless_told(tmp_path):
    base = ["generate", "-n", "2", "--steps", "2", "-o", str(tmp_path / "o"), "--grid", str(tmp_path / "g.png")]
    cli(*base, check=True)
    first = (tmp_path / "o" / "seed0-0001.png").read_bytes()
    proc = cli(*base[:3], "--steps", "3", *base[5:])
    assert proc.returncode == 2 and "already exist" in proc.stderr and "--overwrite" in proc.stderr
    assert (tmp_path / "o" / "seed0-0001.png").read_bytes() == first            # untouched
    proc = cli(*base, "--seed", "1")                                             # the grid file exists
    assert proc.returncode == 2 and "g.png already exists" in proc.stderr
    assert not (tmp_path / "o" / "seed1-0000.png").exists()                     # refused before any work
    cli(*base[:3], "--steps", "3", *base[5:], "--overwrite", check=True)
    assert (tmp_path / "o" / "seed0-0001.png").read_bytes() != first


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_pngs_get_the_permissions_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        images.save_png(Image.new("L", (4, 4)), tmp_path / "a.png")
    finally:
        os.umask(old)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]                    # no temp file left


@pytest.mark.parametrize("shape", [(28, 28), (28, 28, 1), (5, 9, 2), (64, 64, 3), (7, 3, 4), (1, 1, 3)])
def test_pngs_decode_to_the_same_pixels_in_pillow(shape):
    """generate writes PNGs with its own zlib encoder (no Pillow): Pillow must read back exactly
    the pixels, on noise (every filter wins somewhere) and on smooth ramps."""
    rng = np.random.default_rng(len(shape) * 100 + shape[0])
    noise = rng.integers(0, 256, shape, dtype=np.uint8)
    ramp = (np.indices(shape).sum(0) * 37 % 256).astype(np.uint8)
    for pixels in (noise, ramp):
        with Image.open(io.BytesIO(images.png_bytes(pixels))) as im:
            assert im.format == "PNG"
            back = np.asarray(im)
        assert np.array_equal(back.reshape(shape), pixels)


def test_generated_pngs_hold_the_generated_pixels(tmp_path):
    with Generator.open("twemoji", threads=1) as gen:             # RGB
        pixels = gen.generate(2, as_array=True)
    writer = ImageWriter(tmp_path, seed=0)
    writer.check(2, overwrite=False)
    writer.write_group(0, pixels)
    for path, expected in zip(writer.written, pixels):
        assert np.array_equal(np.asarray(Image.open(path)), expected)


def test_without_collect_the_images_come_only_group_by_group():
    """What the CLI asks for (no grid): nothing held for all n images, the same pixels per group."""
    with Generator.open("fashion-mnist", threads=1, memory_budget="1GB") as gen:   # groups of 16
        kept = gen.generate(20, steps=2, as_array=True)
        seen = {}
        assert gen.generate(20, steps=2, collect=False, on_group=lambda first, px: seen.update({first: px.copy()})) \
            is None
    assert sorted(seen) == [0, 16] and np.array_equal(np.concatenate([seen[0], seen[16]]), kept)


def test_an_incomplete_grid_is_padded_with_the_images_background():
    dark = [Image.fromarray(np.full((4, 4), v, np.uint8)) for v in (0, 10, 0)]
    assert np.asarray(images.grid(dark))[6, 6] == 0                             # 2x2 grid, 4th cell
    light = [Image.fromarray(np.full((4, 4, 3), 250, np.uint8))] * 3
    assert tuple(np.asarray(images.grid(light))[6, 6]) == (250, 250, 250)
    with Generator.open("fashion-mnist", threads=1) as gen:                    # black background model
        grid = np.asarray(images.grid(gen.generate(3, steps=5)))
    assert grid[32:, 32:].max() == 0


def test_progress_counts_images_and_finished_groups_survive_an_interrupt(tmp_path):
    seen, calls = [], []
    with Generator.open("fashion-mnist", threads=1, memory_budget="1GB") as gen:   # groups of 16
        assert gen.plan.images_per_group == 16
        gen.generate(20, steps=2, on_progress=lambda done, total: seen.append((done, total)))
        assert seen == [(16, 20), (20, 20)]
        writer = ImageWriter(tmp_path, seed=0)
        writer.check(40, overwrite=False)

        def write_then_stop(first, pixels):
            calls.append(first)
            if len(calls) == 2:
                raise KeyboardInterrupt
            writer.write_group(first, pixels)

        with pytest.raises(KeyboardInterrupt):
            gen.generate(40, steps=2, on_group=write_then_stop)
    assert calls == [0, 16] and sorted(p.name for p in tmp_path.iterdir()) == \
        [f"seed0-{i:04d}.png" for i in range(16)]
    assert writer.summary() == f"16 of 40 images were written to {tmp_path}"


def test_ctrl_c_keeps_the_finished_groups(tmp_path):
    """SIGINT once the first group is on disk: exit 130, every PNG whole, a line that says so."""
    out = tmp_path / "o"
    # SIGINT at its default in the child even where pytest itself was started ignoring it (a
    # script's background job): an ignored SIGINT is kept ignored (the next test).
    proc = subprocess.Popen([sys.executable, "-m", "rissole_edge", "generate", "-n", "10000", "--steps", "10",
                             "--threads", "1", "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not (out / "seed0-0000.png").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    assert proc.returncode == 130, err
    written = sorted(out.glob("seed0-*.png"))
    assert written and len(written) < 10000
    assert f"interrupted: {len(written)} of 10000 images were written to {out}" in err
    for path in written:
        Image.open(path).load()
    assert not list(out.glob(".tmp-*"))


@pytest.mark.parametrize("at_start", [signal.SIG_IGN, signal.default_int_handler])
def test_a_sigint_during_a_write_is_held_unless_the_process_ignores_it(at_start):
    """At the default, a SIGINT while a group is written is held and raised after it. A run
    started with SIGINT ignored (`cmd &` in a script) must not stop because one happened to
    land during a write, and it must still ignore SIGINT afterwards."""
    previous = signal.signal(signal.SIGINT, at_start)
    try:
        if at_start is signal.SIG_IGN:
            try:
                with _interrupts_deferred():
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.01)
            except KeyboardInterrupt:
                pytest.fail("an ignored SIGINT stopped the write")
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        else:
            with pytest.raises(KeyboardInterrupt):
                with _interrupts_deferred():
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.01)
                    reached = True                       # held: the block ran to its end
            assert reached and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_writer_refuses_an_unwritable_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a writable folder"):
        ImageWriter(tmp_path / "file" / "sub", seed=0).check(1, overwrite=False)


def test_generate_json_reports_every_image(tmp_path):
    report = json.loads(cli("generate", "-n", "3", "--steps", "2", "-o", str(tmp_path), "--json",
                            check=True).stdout)
    assert report["images"] == [str(tmp_path / f"seed0-{i:04d}.png") for i in range(3)]


def test_export_warns_when_int8_is_a_poor_trade():
    from rissole_edge.cli import _int8_advice
    assert _int8_advice({"int8_vs_fp32_psnr_mean": 37.1, "int8_speedup": 1.29}) is None     # the shipped one
    assert _int8_advice({}) is None                                                          # an fp32 bundle
    advice = _int8_advice({"int8_vs_fp32_psnr_mean": 17.0, "int8_speedup": 0.8})
    assert "17.0 dB" in advice and "0.80x" in advice and "--quantize fp32" in advice
    assert "--quantize fp32" in _int8_advice({"int8_vs_fp32_psnr_mean": 30.0, "int8_speedup": 0.9})


def test_like_queries_are_fitted_as_training_images_are_by_default():
    """A 28x28 query for a 32x32 model is padded on its edge colour, as data.fit = "pad" trains."""
    small = np.zeros((28, 28), np.uint8)
    small[5:20, 5:20] = 180
    fitted = images.fit(Image.fromarray(small), 32, 1, "#ffffff")[..., 0]
    assert np.array_equal(fitted[2:30, 2:30], small) and fitted[:2].max() == 0


def test_without_a_folder_each_run_gets_a_new_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "generated" / "007").mkdir(parents=True)          # numbering continues after the highest
    pixels = np.zeros((2, 4, 4, 1), np.uint8)
    folders = []
    for _ in range(2):
        writer = ImageWriter(None, seed=0)
        writer.check(2, overwrite=False)                           # nothing to refuse: the folder is new
        writer.write_group(0, pixels)
        folders.append(writer.folder)
        assert writer.summary() == f"2 of 2 images were written to {writer.folder}"
    assert folders == [Path("generated/008"), Path("generated/009")]
    assert sorted(p.name for p in (tmp_path / "generated" / "009").iterdir()) == ["seed0-0000.png", "seed0-0001.png"]


def test_summaries_print_as_flat_lines_not_python_reprs():
    """train, distill and evaluate print their summaries through one formatter: nested tables
    become dotted keys, lists comma-separated, floats to 4 significant digits."""
    from rissole_edge.cli import _flat_lines

    assert _flat_lines({"fd": 12.34567, "per_label": {"bag": 0.5, "coat": 1}, "names": ["a", "b"], "n": 3}) == \
        ["fd: 12.35", "per_label.bag: 0.5", "per_label.coat: 1", "names: a, b", "n: 3"]
