import json
from pathlib import Path

import pytest

from rissole_export import config
from rissole_export.config import ConfigError
from rissole_export.train import REUSED_SECTIONS


@pytest.mark.parametrize("preset", list(config.PRESETS))
def test_presets_resolve_and_round_trip(preset, tmp_path):
    cfg = config.resolve(preset)
    config.save(cfg, tmp_path / "c.json")
    assert config.load(tmp_path / "c.json") == cfg


def test_overrides_apply_and_are_checked():
    cfg = config.resolve("tiny", {"denoiser": {"k": 2, "channel_mult": [1, 2, 2]}, "seed": 7})
    assert cfg.denoiser.k == 2 and cfg.denoiser.channel_mult == (1, 2, 2) and cfg.seed == 7
    with pytest.raises(ConfigError, match="unknown config key 'denoiser.kk'"):
        config.resolve("tiny", {"denoiser": {"kk": 2}})
    with pytest.raises(ConfigError, match="must be an integer"):
        config.resolve("tiny", {"denoiser": {"k": "four"}})
    with pytest.raises(ConfigError, match="database.window must be at least denoiser.k"):
        config.resolve("tiny", {"denoiser": {"k": 20}})
    with pytest.raises(ConfigError, match="unknown preset"):
        config.resolve("huge")


def test_first_difference_names_the_setting():
    a, b = config.resolve("tiny"), config.resolve("tiny", {"denoiser": {"steps": 5}})
    assert config.first_difference(a, b) == "denoiser.steps (600 vs 5)"
    assert config.first_difference(a, config.resolve("tiny")) is None


def test_config_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[denoiser\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.read_config_file(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"denoiser": {"k": 3}}))
    assert config.read_config_file(good) == {"denoiser": {"k": 3}}


ROOT = Path(__file__).resolve().parent.parent
ABLATIONS = sorted((ROOT / "benchmarks" / "ablations").glob("*.toml"))


@pytest.mark.parametrize("path", ABLATIONS, ids=[p.stem for p in ABLATIONS])
def test_ablation_configs_reuse_the_shipped_base(path):
    """Every quality ablation trains with --reuse over the shipped recipe's run, which train
    refuses unless the reused stages' settings match: a config that drifts fails here, not
    after an hour of training."""
    shipped = config.resolve("small", config.read_config_file(ROOT / "models" / "fashion-mnist.toml"))
    variant = config.resolve("small", config.read_config_file(path))
    assert config.first_difference(shipped, variant, REUSED_SECTIONS) is None
    assert variant != shipped


def test_the_shipped_emoji_teacher_reuses_the_twemoji_v2_base():
    """models/twemoji-teacher.toml is twemoji-v2's recipe with another denoiser, so that
    `train --reuse runs/twemoji-v2` (its card's command) is accepted."""
    v2 = config.resolve("small", config.read_config_file(ROOT / "benchmarks" / "ablations" / "recipes" /
                                                         "twemoji-v2.toml"))
    teacher = config.resolve("small", config.read_config_file(ROOT / "models" / "twemoji-teacher.toml"))
    assert config.first_difference(v2, teacher, REUSED_SECTIONS) is None
    assert teacher.denoiser.cross_block and not v2.denoiser.cross_block


def test_the_64x64_claim_rows_differ_from_the_teacher_recipe_only_in_their_denoiser():
    """benchmarks/ablations/paper64.py: every row reuses the twemoji-v2 run's autoencoder and
    database (so data, autoencoder and database must be the recipe's), the same-parameter
    whole-latent row must have the block model's parameters within 1%, and the 4x row 4x."""
    import importlib.util

    from rissole_export import denoiser
    from rissole_export.layers import count_parameters
    spec = importlib.util.spec_from_file_location("paper64", ROOT / "benchmarks" / "ablations" / "paper64.py")
    paper64 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper64)
    recipe = config.resolve("small", config.read_config_file(ROOT / "benchmarks" / "ablations" / "recipes" /
                                                             "twemoji-v2.toml"))
    params = {}
    for row in paper64.ROWS:
        cfg = config.resolve("small", paper64.row_overrides(row, 1, 2000))
        assert config.first_difference(recipe, cfg, REUSED_SECTIONS) is None
        assert cfg.seed == 1 and cfg.denoiser.steps == 2000
        net = denoiser.build(cfg.denoiser, paper64.LATENT_CHANNELS, paper64.LATENT_SIDE)
        params[row] = count_parameters(net)
    assert abs(params["whole"] / params["block"] - 1) < 0.01
    assert abs(params["noretrieval"] / params["block"] - 1) < 0.01
    assert 3.8 < params["whole-4x"] / params["block"] < 4.2


def test_image_sizes_the_models_cannot_divide_are_refused_with_the_nearest_that_work():
    cfg = config.resolve("small", {"data": {"size": 32}})
    config.check_size(cfg)                                   # 32 -> 8x8 latent -> 2x2 blocks of 4 -> 2
    cfg.data.size = 28                                       # the old advice, which failed at the denoiser
    with pytest.raises(config.ConfigError, match="multiple of 16: use --size 16 or 32$"):
        config.check_size(cfg)
    cfg.data.size = 12
    with pytest.raises(config.ConfigError, match="use --size 16$"):
        config.check_size(cfg)
    whole = config.resolve("small", {"data": {"size": 24}, "denoiser": {"kind": "whole"}})
    config.check_size(whole)                                 # no block grid: a multiple of 8 suffices
    with pytest.raises(config.ConfigError, match="data.fit must be one of pad, crop, stretch"):
        config.resolve("small", {"data": {"fit": "zoom"}})


def test_the_learning_rate_schedules():
    """Constant by default (the shipped runs); cosine goes from lr to 0 and depends on the step
    alone, so a resumed run sets the rate each step would have had. The denoiser's may hold lr
    and decay over the last lr_decay_steps only (a cool-down after a constant-rate run)."""
    from rissole_export.train import learning_rate
    constant = config.resolve("tiny").autoencoder
    assert {learning_rate(constant, s) for s in (0, 200, 399)} == {constant.lr}
    cosine = config.resolve("tiny", {"autoencoder": {"lr_schedule": "cosine", "lr": 1e-3, "steps": 400}}).autoencoder
    rates = [learning_rate(cosine, s) for s in range(400)]
    assert rates[0] == pytest.approx(1e-3) and rates[200] == pytest.approx(5e-4) and rates[-1] < 1e-7
    assert all(a > b for a, b in zip(rates, rates[1:]))
    cooled = config.resolve("tiny", {"denoiser": {"lr_schedule": "cosine", "lr": 2e-4, "steps": 400,
                                                  "lr_decay_steps": 100}}).denoiser
    rates = [learning_rate(cooled, s) for s in range(400)]
    assert set(rates[:300]) == {2e-4} and rates[350] == pytest.approx(1e-4) and rates[-1] < 1e-7
    assert all(a > b for a, b in zip(rates[300:], rates[301:]))
    whole = config.resolve("tiny", {"denoiser": {"lr_schedule": "cosine", "steps": 400}}).denoiser
    assert learning_rate(whole, 200) == pytest.approx(whole.lr / 2)          # 0: decay over all steps
    with pytest.raises(ConfigError, match="lr_decay_steps must be in"):
        config.resolve("tiny", {"denoiser": {"steps": 400, "lr_decay_steps": 401}})
    with pytest.raises(ConfigError, match="denoiser.lr_schedule must be"):
        config.resolve("tiny", {"denoiser": {"lr_schedule": "linear"}})
    with pytest.raises(ConfigError, match="lr_schedule must be"):
        config.resolve("tiny", {"autoencoder": {"lr_schedule": "linear"}})
