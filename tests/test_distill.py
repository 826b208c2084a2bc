"""`rissole-edge distill`: few-step students of a run or a bundle, resumable, exportable, refused
at step counts they were not made for, and closer to their teacher's many-step images than the
teacher itself is at their step count."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import SAMPLE, cli
from rissole_edge.bundle import Bundle, BundleError, Spec
from rissole_edge.errors import UsageError
from rissole_edge.schedule import alphas_cumprod
from rissole_export import config, distill, teacher, train
from rissole_export.sampling import RunModels

FAST = {"train_steps": 6, "batch_size": 16, "checkpoint_every": 2, "teacher_steps": 8}


def _weights(path):
    return load_file(str(path))


def test_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path, tiny_run, monkeypatch):
    whole = tmp_path / "whole"
    distill.distill(tiny_run, 2, whole, progress=False, **FAST)
    _stop_after(monkeypatch, 3)
    cut = tmp_path / "cut"
    summary = distill.distill(tiny_run, 2, cut, progress=False, **FAST)
    assert "stopped at step 3/6" in summary["status"]
    assert not (cut / "denoiser.safetensors").exists()
    with pytest.raises(Exception, match="--resume"):
        distill.distill(tiny_run, 2, cut, progress=False, **FAST)
    distill.distill(tiny_run, 2, cut, resume=True, progress=False, **FAST)
    for name in ("student", "denoiser"):
        a, b = _weights(whole / f"{name}.safetensors"), _weights(cut / f"{name}.safetensors")
        assert a.keys() == b.keys()
        assert not [k for k in a if not torch.equal(a[k], b[k])]


def _stop_after(monkeypatch, steps: int) -> None:
    calls = {"n": 0}
    real = train.Context.should_stop

    def stop(self):
        calls["n"] += 1
        return calls["n"] == steps + 1 or real(self)

    monkeypatch.setattr(train.Context, "should_stop", stop)


def test_a_stopped_run_can_be_finished_early(tmp_path, tiny_run, monkeypatch):
    """--resume may lower --train-steps down to the steps done: the student is then written."""
    _stop_after(monkeypatch, 3)
    out = tmp_path / "early"
    assert "stopped at step 3/6" in distill.distill(tiny_run, 2, out, progress=False, **FAST)["status"]
    monkeypatch.undo()
    with pytest.raises(Exception, match="below the 3 steps"):
        distill.distill(tiny_run, 2, out, resume=True, progress=False, **{**FAST, "train_steps": 2})
    with pytest.raises(Exception, match="another steps"):
        distill.distill(tiny_run, 4, out, resume=True, progress=False, **FAST)
    distill.distill(tiny_run, 2, out, resume=True, progress=False, **{**FAST, "train_steps": 3})
    assert json.loads((out / "distill.json").read_text())["train_steps"] == 3
    student, final = _weights(out / "student.safetensors"), _weights(out / "denoiser.safetensors")
    assert all(torch.equal(final[k], v) for k, v in student.items() if k.startswith("ema/"))


def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_run):
    for args, words in [(["--steps", "0"], "between 1 and"), (["--steps", "4", "--teacher-steps", "0"], "positive")]:
        proc = cli("distill", str(tiny_run), "--out", str(tmp_path / "x"), *args)
        assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = cli("distill", str(tmp_path / "missing"), "--steps", "4", "--out", str(tmp_path / "y"))
    assert proc.returncode == 2 and "not found" in proc.stderr
    proc = cli("distill", str(tiny_run), "--steps", "4", "--out", str(tmp_path / "z"), "--resume")
    assert proc.returncode == 2 and "nothing to resume" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_export_records_the_steps_and_the_runtime_refuses_others(tmp_path, tiny_run):
    student = tmp_path / "student"
    distill.distill(tiny_run, 4, student, progress=False, **FAST)
    out = tmp_path / "student.rissole"
    cli("export", str(student), "-o", str(out), "--calibration-samples", "4", check=True)
    manifest = Bundle.open(out).manifest
    assert manifest["sampling"] == {"guidance": 1.0, "sampler": "ddim", "steps": 4, "distilled_steps": 4}
    assert manifest["distilled"]["teacher_steps"] == FAST["teacher_steps"]
    assert Spec.from_manifest(manifest).distilled_steps == 4
    base = ["generate", "-m", str(out), "-n", "1", "-o", str(tmp_path / "png"), "--overwrite"]
    refused = cli(*base, "--steps", "8")
    assert refused.returncode == 2 and "--steps 4" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert cli(*base, "--sampler", "ddpm").returncode == 2
    cli(*base, check=True)                                   # the bundle's own 4 steps by default
    cli(*base, "--steps", "8", "--force-steps", check=True)
    assert "4-step student" in cli("info", str(out), check=True).stdout


def test_malformed_distilled_fields_are_refused(tiny_bundle):
    manifest = Bundle.open(tiny_bundle).manifest
    good = {"guidance": 1.0, "sampler": "ddim", "steps": 4, "distilled_steps": 4}
    assert Spec.from_manifest({**manifest, "sampling": good}).distilled_steps == 4
    assert Spec.from_manifest(manifest).distilled_steps == 0          # an ordinary bundle
    for bad in ({"distilled_steps": "4"}, {"distilled_steps": -1}, {"distilled_steps": 8},
                {"sampler": "ddpm"}, {"distilled_steps": True}):
        with pytest.raises(BundleError, match="sampling"):
            Spec.from_manifest({**manifest, "sampling": {**good, **bad}})


def test_teacher_rebuilt_from_a_bundle_has_the_run_weights(tmp_path, tiny_run):
    """fp32 export: exact weights; int8: within half a quantization step of each weight."""
    cfg = config.load(tiny_run / "config.json")
    run = RunModels.load(tiny_run)
    fp32 = tmp_path / "fp32.rissole"
    cli("export", str(tiny_run), "-o", str(fp32), "--quantize", "fp32", "--calibration-samples", "4", check=True)
    t = teacher.from_bundle(fp32, cfg)
    expected = run.net.state_dict()
    assert all(torch.equal(t.net.state_dict()[k], v) for k, v in expected.items())
    assert torch.allclose(t.latents, run.latents[:len(t.latents)], atol=1e-6)
    assert t.neighbours.shape[1] == cfg.database.window
    assert not (t.neighbours == np.arange(len(t.neighbours))[:, None]).any()   # never the image itself


def test_teacher_rebuilt_from_an_int8_rewritten_bundle_computes_the_run_denoiser(tiny_run, tiny_bundle):
    """int8 per-channel weights dequantized and the graph rewrites (GEMMs for convolutions on
    small maps, expanded GroupNorm constants) undone: on real inputs the rebuilt torch net
    gives the run's output within the weights' quantization error (measured 0.3% RMS). (Not
    compared with the int8 graph itself: on this barely trained tiny model int8 activations
    alone move the output by ~60%, parity 24 dB; on the shipped fashion model 2.3%.)"""
    assert Bundle.open(tiny_bundle).manifest["graph"]["denoiser_rewrites"]
    cfg = config.load(tiny_run / "config.json")
    t = teacher.from_bundle(tiny_bundle, cfg)
    run = RunModels.load(tiny_run)
    g = torch.Generator().manual_seed(0)
    n, positions, c, side, _ = t.latents.shape
    idx, pos = torch.randint(n, (64,), generator=g), torch.randint(positions, (64,), generator=g)
    cond = t.latents[torch.from_numpy(t.neighbours[idx.numpy()][:, :t.net.k]).long(), pos[:, None]]
    cond = cond.reshape(64, -1, side, side)
    x, ts = torch.randn((64, c, side, side), generator=g), torch.randint(1000, (64,), generator=g).float()
    with torch.no_grad():
        want, got = run.net(x, ts, pos, cond), t.net(x, ts, pos, cond)
    assert (got - want).pow(2).mean().sqrt() < 0.02 * want.pow(2).mean().sqrt()


def test_teacher_from_a_bundle_refuses_another_config(tmp_path, tiny_bundle):
    cfg = config.resolve("small")
    with pytest.raises(Exception, match="does not match the config|the config says"):
        teacher.from_bundle(tiny_bundle, cfg)


def _landing_errors(run, net, steps: int, batch: int = 256) -> list[float]:
    """Per student step: mean squared distance between where one DDIM step of `net` lands and
    where the teacher's sub-steps land, from the same noisy inputs (fresh, not training's)."""
    t = teacher.from_run(run, 1.0)
    alpha_bar = alphas_cumprod(t.cfg.denoiser.schedule, t.cfg.denoiser.timesteps)
    starts, sub = distill.grid(alpha_bar, steps, 50)
    eps_fn = distill.TeacherEps(t.model, 1.0, 1)
    g = torch.Generator().manual_seed(12345)
    n, positions, c, side, _ = t.latents.shape
    idx, pos = torch.randint(n, (batch,), generator=g), torch.randint(positions, (batch,), generator=g)
    nb = torch.from_numpy(t.neighbours[idx.numpy()][:, :t.net.k]).long()
    cond = t.latents[nb, pos[:, None]].reshape(batch, -1, side, side)
    errors = []
    for i in range(len(starts) - 1):                 # the last step (t = 0 to clean) is trivial
        a, s = (float(np.sqrt(v)) for v in (alpha_bar[starts[i]], 1 - alpha_bar[starts[i]]))
        a2, s2 = (float(np.sqrt(v)) for v in (alpha_bar[starts[i + 1]], 1 - alpha_bar[starts[i + 1]]))
        xt = a * t.latents[idx, pos] + s * torch.randn((batch, c, side, side), generator=g)
        x0 = torch.from_numpy(distill.teacher_targets(eps_fn, alpha_bar, sub, np.full(batch, i), xt.numpy(),
                                                       pos.numpy(), cond.numpy()))
        landing = a2 * x0 + s2 / s * (xt - a * x0)
        with torch.no_grad():
            eps = net(xt, torch.full((batch,), float(starts[i])), pos, cond)
        mine = a2 * (xt - s * eps) / a + s2 * eps
        errors.append(float(((mine - landing) ** 2).mean()))
    return errors


def test_each_student_step_lands_nearer_the_teachers_sub_steps_than_its_own_step(tmp_path, tiny_run, tiny_config):
    """The measure can fail: from the same noisy inputs, where one student step lands against
    where the teacher's 50-step sub-steps land, summed over the student's steps, for the
    student and for the teacher taking the same single steps. The teacher is the tiny run's
    denoiser trained 10x longer (600 steps): the session's 60-step one is too poor for its own
    many-step paths to stay near the data (its targets at t = 999 have std ~100). End to end,
    the distance of 4-step images to the teacher's 50-step images is measured on the shipped
    model by benchmarks/distilled.py."""
    recipe = tmp_path / "teacher.toml"
    recipe.write_text(tiny_config.read_text().replace("[denoiser]\nsteps = 60", "[denoiser]\nsteps = 600"))
    run = tmp_path / "teacher"
    cli("train", str(SAMPLE), "--out", str(run), "--preset", "tiny", "--config", str(recipe),
        "--reuse", str(tiny_run), check=True)
    student = tmp_path / "student4"
    distill.distill(run, 4, student, progress=False, train_steps=300, batch_size=64, lr=1e-3,
                    teacher_steps=50, checkpoint_every=1000)
    teacher_errors = _landing_errors(run, RunModels.load(run).net, 4)
    student_errors = _landing_errors(run, RunModels.load(student).net, 4)
    (tmp_path / "landing.json").write_text(json.dumps({"teacher": teacher_errors, "student": student_errors}))
    assert sum(student_errors) < 0.8 * sum(teacher_errors), (student_errors, teacher_errors)


@pytest.mark.parametrize("student,teacher,label,same_teacher", [
    ("fashion-mnist-4step", "fashion-mnist", "sneaker", False),     # a student of e00c704's teacher
    ("twemoji", "twemoji-teacher", "food-drink", None)])      # distilled from twemoji-teacher's training run
def test_the_shipped_4_step_bundles_verify_generate_and_refuse_other_steps(tmp_path, student, teacher, label,
                                                                          same_teacher):
    """CI never distils the shipped students; it checks that each verifies, generates at its 4
    steps by default, refuses others, and names its shipped teacher (`twemoji` is the default
    name's student: its teacher ships as `twemoji-teacher`). `same_teacher` says what the card
    claims of the recorded teacher hash: True, the very teacher file shipped beside it; False,
    another file; None, no file at all (distilled from the teacher's training run, whose
    export is the shipped teacher). Re-shipping one bundle without the other would break the
    claim, and this test would say so."""
    import hashlib

    from PIL import Image

    from rissole_edge.shipped import shipped_bundle

    assert cli("verify", student).returncode == 0
    report = json.loads(cli("generate", "-m", student, "--label", label, "-n", "2",
                            "-o", str(tmp_path), "--json", check=True).stdout)
    assert np.asarray(Image.open(report["images"][0])).std() > 5
    refused = cli("generate", "-m", student, "--steps", "10", "-o", str(tmp_path / "x"))
    assert refused.returncode == 2 and "--steps 4" in refused.stderr
    manifest = Bundle.open(shipped_bundle(student)).manifest
    assert Spec.from_manifest(manifest).steps == 4 and manifest["distilled"]["teacher"] == teacher
    assert Spec.from_manifest(Bundle.open(shipped_bundle(teacher)).manifest).distilled_steps == 0
    teacher_hash = hashlib.sha256(shipped_bundle(teacher).read_bytes()).hexdigest()
    recorded = manifest["distilled"].get("teacher_sha256")
    assert recorded is None if same_teacher is None else (recorded == teacher_hash) is same_teacher
    if same_teacher is None:          # one training run: the same autoencoder and database, byte for byte
        ours, theirs = Bundle.open(shipped_bundle(student)), Bundle.open(shipped_bundle(teacher))
        assert set(ours.members) == set(theirs.members)
        assert all(ours.read(m) == theirs.read(m) for m in ours.members if m != "denoiser.onnx")


def test_evaluate_samples_a_distilled_bundle_at_its_own_steps():
    """`evaluate` without --steps must not ask a 4-step student for 50 steps (it refuses them);
    a plain bundle keeps 50 DDIM steps, so its rows stay comparable with earlier ones."""
    from rissole_edge.shipped import shipped_bundle
    from rissole_export.evaluate import _open_bundle

    for name, expected in (("fashion-mnist-4step", 4), ("fashion-mnist", 50)):
        source = _open_bundle(shipped_bundle(name), log=lambda msg: None)
        try:
            assert source.default_steps == expected
            if expected == 4:
                assert source.generate(1, 0, source.default_steps).shape == (1, 32, 32, 1)
        finally:
            source.close()
    with pytest.raises(UsageError, match="distilled"):         # its teacher's guidance is folded in
        _open_bundle(shipped_bundle("fashion-mnist-4step"), log=lambda msg: None, guidance=2.0)
