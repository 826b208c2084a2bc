"""Long work tells you how long: the progress line, its ETA, log lines when piped, and the
estimate `train` prints before it starts."""

import json

import pytest

from rissole_edge import progress
from rissole_edge.progress import Progress, duration

from conftest import SAMPLE, cli


def test_durations_read_like_a_person_plans():
    assert [duration(s) for s in (4.4, 59.6, 250, 3900)] == ["4 s", "1 min 00 s", "4 min 10 s", "1 h 05 min"]


def test_piped_progress_prints_log_lines_with_an_eta_and_a_last_line(monkeypatch, capsys):
    clock = iter([0.0, 10.0, 40.0, 70.0, 80.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    bar = Progress(100, "denoiser steps", enabled=None, log_every=30)        # stderr is not a TTY here
    bar.update(10)            # t=10: too soon after the start
    bar.update(40)            # t=40: 40 steps in 40 s, 60 left
    bar.update(70)            # t=70: 30 s after the last line
    bar.update(100)           # t=80: the end is always shown
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["denoiser steps 40/100 (40%), 1/s, 40 s elapsed, ETA 1 min 00 s",
                     "denoiser steps 70/100 (70%), 1/s, 1 min 10 s elapsed, ETA 30 s",
                     "denoiser steps 100/100 (100%), 1.25/s, 1 min 20 s elapsed"]


def test_without_log_lines_piped_progress_is_silent(capsys):
    bar = Progress(3, "images")
    for i in range(1, 4):
        bar.update(i)
    bar.close()
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_train_estimates_first_logs_when_piped_and_prints_json(tmp_path, tiny_config):
    proc = cli("train", str(SAMPLE), "--out", str(tmp_path / "run"), "--preset", "tiny", "--config", str(tiny_config),
               "--stage", "autoencoder", "--json", check=True)
    summary = json.loads(proc.stdout)
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("estimate: about ") and "autoencoder 80 steps x " in lines[0]
    assert lines[-1].startswith("autoencoder steps 80/80 (100%)")
    assert summary["status"] == "complete" and summary["estimate_s"]["autoencoder"] > 0
    assert summary["stage_s"]["autoencoder"] > 0 and summary["autoencoder"]["parameters"] > 0
    text = cli("train", str(SAMPLE), "--out", str(tmp_path / "run"), "--stage", "database", check=True).stdout
    assert "database.recall: " in text and "{" not in text                   # key: value lines, no reprs
