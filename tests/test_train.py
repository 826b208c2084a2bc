"""`rissole-edge train` end to end: outputs, bad input, resume after a kill, DDP."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import SAMPLE, cli, train_variant


def test_a_run_holds_everything(tiny_run):
    for name in ("config.json", "autoencoder.safetensors", "autoencoder.json", "denoiser.safetensors",
                 "metrics.jsonl", "database/meta.json", "database/index.bin", "database/codes.npy"):
        assert (tiny_run / name).exists(), name
    weights = load_file(str(tiny_run / "denoiser.safetensors"))
    assert any(k.startswith("ema/") for k in weights) and any(k.startswith("optim/") for k in weights)
    stages = {json.loads(line)["stage"] for line in (tiny_run / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"autoencoder", "database", "denoiser"}
    grids = list((tiny_run / "samples").glob("denoiser-*.png"))
    assert grids and Image.open(grids[0]).size[0] == 8 * 16


def safe_open_metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _assert_one_line_error(proc, text):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_bad_inputs_get_one_line_and_exit_2(tmp_path, tiny_run, tiny_config):
    out = str(tmp_path / "run")
    _assert_one_line_error(cli("train", str(tmp_path / "nope"), "--out", out), "not found")
    (tmp_path / "empty").mkdir()
    _assert_one_line_error(cli("train", str(tmp_path / "empty"), "--out", out), "no images")
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "a.png").write_bytes(b"not a png")
    _assert_one_line_error(cli("train", str(tmp_path / "unreadable"), "--out", out), "no readable image")
    _assert_one_line_error(cli("train", str(SAMPLE), "--out", out, "--size", "28"), "use --size 16 or 32")
    _assert_one_line_error(cli("train", str(SAMPLE), "--out", out, "--size", "4"), "at least 8")
    _assert_one_line_error(cli("train", str(SAMPLE), "--out", out, "--preset", "huge"), "unknown preset")
    _assert_one_line_error(cli("train", str(SAMPLE), "--out", str(tiny_run), "--preset", "tiny"),
                           "different config")
    _assert_one_line_error(cli("train", str(SAMPLE), "--out", out, "--resume"), "nothing to resume")
    assert not (tmp_path / "run").exists()


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, tiny_run, tiny_config):
    run = tmp_path / "killed"
    args = ["train", str(SAMPLE), "--out", str(run), "--preset", "tiny", "--config", str(tiny_config)]
    proc = subprocess.Popen([sys.executable, "-m", "rissole_edge", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (run / "autoencoder.safetensors").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "denoiser.safetensors").exists()            # killed mid-way
    without_resume = cli(*args)
    assert without_resume.returncode == 2 and "--resume" in without_resume.stderr
    cli(*args[:4], "--resume", check=True)                        # the stored config is used
    for name in ("autoencoder", "denoiser"):
        a = load_file(str(run / f"{name}.safetensors"))
        b = load_file(str(tiny_run / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        different = [k for k in a if not (a[k] == b[k]).all()]
        assert not different, f"{name}: {different[:3]}"


def test_resume_may_extend_and_cool_down_the_denoiser(tmp_path, tiny_run):
    """--resume --config may raise denoiser.steps and add a decay that starts at or after the
    checkpoint (a constant-rate run trained longer, then cooled down); a schedule that would
    rewrite a step already taken, an end behind the checkpoint or any other change is refused."""
    run = tmp_path / "longer"
    shutil.copytree(tiny_run, run)
    base = ["train", str(SAMPLE), "--out", str(run), "--resume", "--config"]

    def attempt(name, text):
        path = tmp_path / name
        path.write_text(text)
        return cli(*base, str(path))

    _assert_one_line_error(attempt("early.toml", "[denoiser]\nsteps = 80\nlr_schedule = 'cosine'\n"
                                   "lr_decay_steps = 40\n"), "changes step 41")
    _assert_one_line_error(attempt("behind.toml", "[denoiser]\nsteps = 50\n"), "behind the run's checkpoint")
    _assert_one_line_error(attempt("wider.toml", "[denoiser]\nsteps = 80\nchannels = 24\n"),
                           "different config: denoiser.channels")
    before = load_file(str(run / "denoiser.safetensors"))
    proc = attempt("longer.toml", "[denoiser]\nsteps = 80\nlr_schedule = 'cosine'\nlr_decay_steps = 20\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stored = json.loads((run / "config.json").read_text())["denoiser"]
    assert (stored["steps"], stored["lr_schedule"], stored["lr_decay_steps"]) == (80, "cosine", 20)
    after = load_file(str(run / "denoiser.safetensors"))
    assert not (after["ema/out.2.weight"] == before["ema/out.2.weight"]).all()     # it trained on
    groups = json.loads(safe_open_metadata(run / "denoiser.safetensors")["param_groups"])
    assert groups["optim"][0]["lr"] < 0.02 * stored["lr"]                  # the last step's rate: cooled
    assert cli(*base[:4], "--resume").returncode == 0                             # complete: nothing to do


def test_an_ignored_sigint_stays_ignored_while_training():
    """A training run started with SIGINT ignored (a script's background job) keeps ignoring it;
    SIGTERM still checkpoints and stops."""
    from rissole_export.train import stop_on_signals

    class Ctx:
        signalled = False

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_on_signals(Ctx):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert not Ctx.signalled
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert Ctx.signalled
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
def test_max_minutes_stops_with_a_checkpoint(tmp_path, tiny_config):
    run = tmp_path / "short"
    proc = cli("train", str(SAMPLE), "--out", str(run), "--preset", "tiny", "--config", str(tiny_config),
               "--max-minutes", "0.001", "--json", check=True)
    summary = json.loads(proc.stdout)
    assert "continue with --resume" in summary["status"]
    assert (run / "autoencoder.safetensors").exists()


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tmp_path, tiny_config):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "-m", "rissole_edge", "train", str(SAMPLE), "--out", str(run), "--preset", "tiny",
                           "--config", str(tiny_config)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    weights = load_file(str(run / "denoiser.safetensors"))
    assert weights["model/out.2.weight"].abs().sum() > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["stage"] == "database"]) == 1        # rank 0 writes alone


def test_runtime_only_install_explains_how_to_get_the_toolchain(tmp_path):
    """Without torch (a plain `pip install .`), toolchain commands say how to install it."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from rissole_edge.cli import main\n"
            f"sys.argv = ['rissole-edge', 'train', 'fashion-mnist', '--out', r'{tmp_path / 'run'}']\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: this command needs the toolchain (torch is missing): " \
                                  "pip install '.[export]' in a clone of rissole-edge"


@pytest.mark.slow
def test_patch_discriminator_trains_and_resumes(tmp_path):
    config = tmp_path / "disc.toml"
    config.write_text("[data]\nsize = 16\n[autoencoder]\nsteps = 30\ndisc_weight = 0.1\ndisc_start = 10\n")
    run = tmp_path / "disc"
    cli("train", str(SAMPLE), "--out", str(run), "--preset", "tiny", "--config", str(config),
        "--stage", "autoencoder", check=True)
    weights = load_file(str(run / "autoencoder.safetensors"))
    assert any(k.startswith("disc/") for k in weights) and any(k.startswith("disc_optim/") for k in weights)


def test_reuse_trains_a_denoiser_variant_on_the_same_autoencoder_and_database(tmp_path, tiny_run, tiny_config):
    out = train_variant(tiny_run, tiny_config, tmp_path / "noretrieval", "block-noretrieval")
    assert (out / "autoencoder.safetensors").read_bytes() == (tiny_run / "autoencoder.safetensors").read_bytes()
    assert (out / "database" / "meta.json").read_bytes() == (tiny_run / "database" / "meta.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["denoiser"]["kind"] == "block-noretrieval"
    assert (out / "denoiser.safetensors").exists()

    for name in ("autoencoder.safetensors", "autoencoder.json"):  # a copied stage deleted later
        (out / name).unlink()
    denoiser_bytes = (out / "denoiser.safetensors").read_bytes()
    proc = cli("train", str(SAMPLE), "--out", str(out), "--resume")
    assert proc.returncode == 2 and "--reuse" in proc.stderr and "denoiser" in proc.stderr, proc.stderr
    assert not (out / "autoencoder.safetensors").exists()        # nothing retrained
    cli("train", str(SAMPLE), "--out", str(out), "--resume", "--reuse", str(tiny_run), check=True)
    assert (out / "denoiser.safetensors").read_bytes() == denoiser_bytes

    other = tmp_path / "other.toml"                       # a different autoencoder cannot be reused
    other.write_text(tiny_config.read_text().replace("[autoencoder]", "[autoencoder]\ncodebook_size = 32"))
    proc = cli("train", str(SAMPLE), "--out", str(tmp_path / "bad"), "--preset", "tiny", "--config", str(other),
               "--reuse", str(tiny_run))
    assert proc.returncode == 2 and "autoencoder.codebook_size" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_a_folder_of_mixed_sizes_trains_under_the_default_size(tmp_path):
    """28x28 (refused before as smaller than 32), wide and large images side by side: each is
    fitted to data.size, and training starts (the autoencoder stage)."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(28, 28)] * 6 + [(60, 20)] * 3 + [(100, 80)] * 3):
        Image.fromarray(rng.integers(0, 255, (h, w), np.uint8)).save(folder / f"{i}.png")
    config = tmp_path / "short.toml"
    config.write_text("[autoencoder]\nsteps = 3\n")
    run = tmp_path / "run"
    cli("train", str(folder), "--out", str(run), "--preset", "tiny", "--config", str(config),
        "--stage", "autoencoder", check=True)
    stored = json.loads((run / "config.json").read_text())["data"]
    assert (stored["size"], stored["fit"]) == (32, "pad") and (run / "autoencoder.safetensors").exists()


def test_heldout_loss_ranks_a_trained_denoiser_above_an_untrained_one(tiny_run):
    """benchmarks/heldout_loss.py: the run's EMA denoiser has a lower epsilon loss on held-out
    and training images than the same network at its initial weights, on the same noise."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import heldout_loss
    from rissole_export import data
    from rissole_export.sampling import RunModels

    m = RunModels.load(tiny_run)
    images = data.load(m.cfg.data.source, m.cfg.data)
    assert len(images.test)
    latents, neighbours = heldout_loss.test_set(m, images.test, tiny_run / "database")
    assert neighbours.shape == (len(images.test), m.cfg.denoiser.k)
    trained = heldout_loss.losses(m, latents, neighbours)
    assert trained == heldout_loss.losses(m, latents, neighbours)          # the same noise every time
    torch.manual_seed(0)
    for p in m.net.parameters():
        torch.nn.init.normal_(p, std=0.02)
    untrained = heldout_loss.losses(m, latents, neighbours)
    assert sum(trained.values()) < sum(untrained.values())
