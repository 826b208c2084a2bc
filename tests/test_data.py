import numpy as np
import pytest
from PIL import Image

from rissole_edge.errors import DataError
from rissole_export import data, emoji_groups
from rissole_export.config import DataConfig

from conftest import SAMPLE


def test_folder_sample_has_labels_and_a_stable_split():
    a = data.load(str(SAMPLE), DataConfig(size=16, channels=1))
    b = data.load(str(SAMPLE), DataConfig(size=16, channels=1))
    assert a.train.shape[1:] == (16, 16, 1) and a.train.dtype == np.uint8
    assert len(a.train) + len(a.test) == 300 and 10 < len(a.test) < 60
    assert a.class_names[0] == "ankle-boot" and len(a.class_names) == 10
    assert np.array_equal(a.train_labels, b.train_labels) and np.array_equal(a.test, b.test)


def test_folder_reads_formats_composites_alpha_and_converts_channels(tmp_path):
    (tmp_path / "red").mkdir()
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:20, :, 3] = 255          # top half opaque red, bottom half transparent
    Image.fromarray(rgba).save(tmp_path / "red" / "a.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "red" / "b.jpg")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "red" / "c.webp")
    ds = data.load(str(tmp_path), DataConfig(size=32, channels=3, background="#0000ff", test_percent=0))
    assert len(ds.train) == 3 and ds.class_names == ["red"]
    png = ds.train[0]
    assert tuple(png[2, 16]) == (255, 0, 0) and tuple(png[30, 16]) == (0, 0, 255)
    grey = data.load(str(tmp_path), DataConfig(size=32, channels=1, test_percent=0))
    assert grey.train.shape == (3, 32, 32, 1)


def test_folder_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="not found"):
        data.load(str(tmp_path / "missing"), DataConfig())
    with pytest.raises(DataError, match="no images"):
        data.load(str(tmp_path), DataConfig())
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="no readable image among the 1 files found: .*broken.png"):
        data.load(str(tmp_path), DataConfig(size=8))
    Image.new("L", (10, 10)).save(tmp_path / "small.png")
    ds = data.load(str(tmp_path), DataConfig(size=8, test_percent=0))
    assert len(ds.train) == 1 and len(ds.skipped) == 1 and "broken.png" in ds.skipped[0]   # skipped, said
    with pytest.raises(DataError, match="not a colour"):
        data.load(str(tmp_path), DataConfig(size=8, background="blurple"))


def test_any_size_and_aspect_is_fitted_to_the_square(tmp_path):
    """28x28 on black (Fashion-MNIST style) pads to 32 on black; a large 3:1 image is resized
    and centre-cropped; "crop" and "stretch" are the other policies."""
    small = np.zeros((28, 28), np.uint8)
    small[10:18, 10:18] = 200
    Image.fromarray(small).save(tmp_path / "small.png")
    wide = np.zeros((40, 120), np.uint8)
    wide[:, 40:80] = 255                                    # a white middle third
    Image.fromarray(wide).save(tmp_path / "wide.png")
    images = lambda fit: dict(zip(("small", "wide"), data.load(str(tmp_path), DataConfig(
        size=32, channels=1, fit=fit, test_percent=0)).train[..., 0]))
    pad = images("pad")
    assert pad["small"].shape == (32, 32) and np.array_equal(pad["small"][2:30, 2:30], small)
    assert pad["small"][:2].max() == 0                       # padded with its own (black) edge
    assert pad["wide"].min() > 200                           # the centre crop is the white third
    crop = images("crop")
    assert crop["small"][16, 16] == 200 and crop["small"][0, 0] == 0 and crop["small"][12, 12] > 100
    stretch = images("stretch")
    assert stretch["wide"][:, :8].max() < 30 and stretch["wide"][:, 12:20].min() > 200



def test_fashion_mnist_official_split_or_install_hint(monkeypatch, tmp_path):
    if data.FASHION_DIR.exists():
        ds = data.load("fashion-mnist", DataConfig())
        assert ds.train.shape == (60000, 32, 32, 1) and ds.test.shape == (10000, 32, 32, 1)
        assert ds.train[:, :2].max() == 0          # 28x28 padded with black
        assert set(np.unique(ds.train_labels)) == set(range(10))
    monkeypatch.setattr(data, "FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        data.load("fashion-mnist", DataConfig())


def test_twemoji_loads_on_white_with_emoji_groups_and_known_variants():
    ds = data.load("twemoji", DataConfig(size=16))
    assert ds.train.shape[1:] == (16, 16, 3) and len(ds.train) + len(ds.test) > 3000
    assert ds.train[:, 0, 0].mean() > 200          # corners are transparent -> white background
    assert ds.class_names == list(emoji_groups.GROUPS) and len(ds.train_labels) == len(ds.train)
    assert set(np.unique(ds.train_labels)) == set(range(len(emoji_groups.GROUPS)))
    assert ds.test_variants.shape == (len(ds.test),) and 0 < ds.test_variants.sum() < len(ds.test)
    sizes = np.bincount(ds.train_families)
    assert ds.train_families.shape == (len(ds.train),) and sizes.min() >= 1
    assert (sizes == 1).any() and sizes.max() >= 5     # lone emoji, and ones with five skin tones (or more)


@pytest.mark.parametrize("name,group", [
    ("1f600.png", "smileys-emotion"), ("1f44d-1f3fd.png", "people-body"),      # a skin-tone variant
    ("1f9d1-1f3fb-200d-1f384.png", "people-body"), ("1f3fb.png", "component"),
    ("1f1e6.png", "component"), ("1f1eb-1f1f7.png", "flags"), ("1f980.png", "animals-nature"),  # crab (17.0)
    ("1fadc.png", "food-drink"), ("1f355.png", "food-drink"), ("2764-fe0f.png", "smileys-emotion"), ("267b.png", "symbols"),
    ("23-20e3.png", "symbols"), ("1f697.png", "travel-places"), ("26bd.png", "activities"),
    ("1f4f1.png", "objects"), ("1f3f4-e0067-e0062-e0065-e006e-e0067-e007f.png", "flags")])
def test_twemoji_files_get_their_unicode_emoji_group(name, group):
    assert emoji_groups.group_of(name) == group


def test_skin_tone_variants_share_a_base_and_unknown_names_are_refused():
    assert emoji_groups.base("1f44d-1f3fd.png") == emoji_groups.base("1f44d.png") == "1f44d"
    assert emoji_groups.base("1f3fd.png") == "1f3fd"
    with pytest.raises(ValueError, match="Twemoji file name"):
        emoji_groups.group_of("not-an-emoji.png")
    with pytest.raises(ValueError, match="no emoji group"):
        emoji_groups.group_of("e000.png")
