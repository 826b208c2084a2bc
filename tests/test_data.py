import numpy as np
import pytest
from PIL import Image

from rissole_edge.errors import DataError
from rissole_export import data
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
    Image.new("L", (10, 10)).save(tmp_path / "small.png")
    with pytest.raises(DataError, match="smaller than the configured size 32"):
        data.load(str(tmp_path), DataConfig(size=32))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read image"):
        data.load(str(tmp_path), DataConfig(size=8))
    with pytest.raises(DataError, match="not a colour"):
        data.load(str(tmp_path), DataConfig(size=8, background="blurple"))


def test_fashion_mnist_official_split_or_install_hint(monkeypatch, tmp_path):
    if data.FASHION_DIR.exists():
        ds = data.load("fashion-mnist", DataConfig())
        assert ds.train.shape == (60000, 32, 32, 1) and ds.test.shape == (10000, 32, 32, 1)
        assert ds.train[:, :2].max() == 0          # 28x28 padded with black
        assert set(np.unique(ds.train_labels)) == set(range(10))
    monkeypatch.setattr(data, "FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        data.load("fashion-mnist", DataConfig())


def test_twemoji_loads_on_white():
    ds = data.load("twemoji", DataConfig(size=16))
    assert ds.train.shape[1:] == (16, 16, 3) and len(ds.train) + len(ds.test) > 3000
    assert ds.train[:, 0, 0].mean() > 200          # corners are transparent -> white background
