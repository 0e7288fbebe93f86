"""`prepare`: decode once into a uint8 memmap cache, reuse it, skip and report corrupt images."""

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchbench.cli import main
from patchbench.config import DataConfig
from patchbench.data import PreparedData, prepare
from patchbench.data.cache import decode_image

WNIDS = ["n01440764", "n02102040", "n02979186"]


def make_folder(root: Path, per_class=(3, 2), size=(48, 36)) -> Path:
    """Each image is one flat colour, encoding (split, class, index), so content can be checked."""
    for s, (split, n) in enumerate(zip(("train", "val"), per_class)):
        for c, w in enumerate(WNIDS):
            d = root / split / w
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour = (40 + 100 * s, 40 + 60 * c, 40 + 50 * i)
                Image.new("RGB", size, colour).save(d / f"{w}_{i}.JPEG", quality=95)
    return root


def cfg_for(source, tmp_path, **kw) -> DataConfig:
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)


def test_decode_resizes_shorter_side_and_centre_crops(tmp_path):
    im = np.zeros((40, 100, 3), np.uint8)
    im[:, 30:70] = 255  # a white band in the middle 40 columns
    Image.fromarray(im).save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png", 20)  # 40x100 -> 20x50 -> centre 20x20 = cols 15..35
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert out[:, 2:18].min() > 200  # all white (resampling blurs only the outer edge columns)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "grey.png")  # greyscale -> RGB
    assert decode_image(tmp_path / "grey.png", 8).shape == (8, 8, 3)


def test_prepare_valid_folder(tmp_path):
    root = make_folder(tmp_path / "toy")
    data = prepare(cfg_for(root, tmp_path, prepare_size=16), progress=False, workers=2)
    assert isinstance(data, PreparedData) and not data.reused
    assert data.wnids == WNIDS and data.classes == ["tench", "English springer", "cassette player"]
    assert data.train.images.shape == (9, 16, 16, 3) and data.train.images.dtype == np.uint8
    assert isinstance(data.train.images, np.memmap)
    assert data.val.images.shape == (6, 16, 16, 3)
    assert data.train.labels.dtype == np.int64
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # pixel content follows the file: val class 2 image 1 has colour (140, 160, 90)
    np.testing.assert_allclose(data.val.images[5].reshape(-1, 3).mean(0), [140, 160, 90], atol=3)
    index = json.loads((data.path / "index.json").read_text())
    assert index["counts"] == {"train": 9, "val": 6} and index["num_skipped"] == 0
    assert index["prepare_size"] == 16 and index["source"] == str(root) and len(index["fingerprint"]) == 16


def test_rerun_does_no_work_sizes_coexist_and_changed_source_is_reprepared(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "toy")
    first = prepare(cfg_for(root, tmp_path, prepare_size=16), progress=False, workers=1)

    from patchbench.data import cache

    def fail(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache, "_build", fail)
    again = prepare(cfg_for(root, tmp_path, prepare_size=16), progress=False)
    assert again.reused and again.path == first.path
    monkeypatch.undo()

    other = prepare(cfg_for(root, tmp_path, prepare_size=24), progress=False, workers=1)
    assert other.path != first.path and other.train.images.shape[1:] == (24, 24, 3)
    assert (first.path / "index.json").exists()  # both sizes kept

    Image.new("RGB", (48, 36), (1, 2, 3)).save(root / "train" / WNIDS[0] / "new.JPEG")
    changed = prepare(cfg_for(root, tmp_path, prepare_size=16), progress=False, workers=1)
    assert not changed.reused and changed.path != first.path and len(changed.train) == 10


def test_corrupt_and_truncated_images_are_skipped_reported_and_counted(tmp_path, capsys):
    root = make_folder(tmp_path / "toy")
    bad = root / "train" / WNIDS[1] / "corrupt.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    good = (root / "val" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG").read_bytes()
    truncated = root / "val" / WNIDS[2] / "truncated.JPEG"
    truncated.write_bytes(good[: len(good) // 2])
    data = prepare(cfg_for(root, tmp_path, prepare_size=16), progress=False, workers=2)
    err = capsys.readouterr().err
    assert str(bad) in err and str(truncated) in err and "2 unreadable image(s) were skipped" in err
    assert len(data.train) == 9 and len(data.val) == 6  # the good ones, no holes
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert np.all(data.train.images.reshape(9, -1).max(1) > 0)  # every kept row was written
    assert {s["path"] for s in data.skipped} == {str(bad), str(truncated)}
    assert json.loads((data.path / "index.json").read_text())["num_skipped"] == 2
    prepare(cfg_for(root, tmp_path, prepare_size=16), progress=False)  # reused: still said
    assert "2 unreadable image(s) were skipped" in capsys.readouterr().err


def test_cli_prepare_archive_with_md5(tmp_path, capsys):
    root = make_folder(tmp_path / "toy")
    archive = tmp_path / "toy.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="toy")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    argv = ["data", "prepare", "--data", str(archive), "--md5", md5, "--img-size", "20",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "9 train / 6 val images in 3 classes at 20x20 (prepared in" in out
    assert "skipped unreadable images: 0" in out
    assert main(argv) == 0
    assert "nothing decoded" in capsys.readouterr().out
    assert main(argv[:5] + ["0" * 32] + argv[6:]) == 2
    assert "MD5 mismatch" in capsys.readouterr().err


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["data", "prepare", "--data", str(tmp_path / "missing"), "--cache-dir", str(tmp_path)]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    root = make_folder(tmp_path / "toy")
    (root / "val" / WNIDS[0]).rename(tmp_path / "moved")
    for f in (root / "val").rglob("*.JPEG"):
        f.unlink()
    assert main(["data", "prepare", "--data", str(root), "--cache-dir", str(tmp_path)]) == 2
    assert "empty class folder" in capsys.readouterr().err


def test_cli_list(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "imagenette-160" in out and "e793b78cc4c9e9a4ccc0c1155377a412" in out and "imagewoof-320" in out


@pytest.mark.parametrize("size", [0, -4])
def test_bad_prepare_size(tmp_path, size):
    from patchbench.errors import UserError
    with pytest.raises(UserError, match="prepare_size"):
        prepare(cfg_for(make_folder(tmp_path / "toy"), tmp_path, prepare_size=size), progress=False)


def test_reextracting_the_same_archive_reuses_the_prepared_cache(tmp_path):
    root = make_folder(tmp_path / "toy")
    archive = tmp_path / "toy.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="toy")
    cfg = cfg_for(archive, tmp_path, prepare_size=12)
    first = prepare(cfg, progress=False, workers=1)
    shutil.rmtree(tmp_path / "cache" / "extracted")  # files come back with the archive's mtimes
    again = prepare(cfg, progress=False, workers=1)
    assert again.reused and again.path == first.path


# --------------------------------------------------------------------------------------------------
# Every image mode PIL opens: the right RGB values, or skipped and reported

GREY = np.array([[0, 1, 64, 127], [128, 200, 254, 255]], dtype=np.uint8)


def _expected_grey(values8: np.ndarray) -> np.ndarray:
    return np.repeat(values8[..., None], 3, axis=2)


MODES = {
    # mode: (how to make it, file suffix, the RGB it means)
    "1": (lambda: Image.fromarray(GREY > 127), ".png", _expected_grey(np.where(GREY > 127, 255, 0).astype(np.uint8))),
    "L": (lambda: Image.fromarray(GREY), ".png", _expected_grey(GREY)),
    "LA": (lambda: Image.merge("LA", [Image.fromarray(GREY), Image.fromarray(255 - GREY)]), ".png", _expected_grey(GREY)),
    "P": (lambda: _palette(), ".png", np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]] * 2,
                                              dtype=np.uint8)),
    "RGB": (lambda: Image.fromarray(np.dstack([GREY, 255 - GREY, GREY // 2])), ".png",
            np.dstack([GREY, 255 - GREY, GREY // 2])),
    "RGBA": (lambda: Image.fromarray(np.dstack([GREY, 255 - GREY, GREY // 2, GREY])), ".png",  # alpha dropped
             np.dstack([GREY, 255 - GREY, GREY // 2])),
    "I;16": (lambda: Image.fromarray(GREY.astype(np.uint16) * 257), ".png", _expected_grey(GREY)),  # 16-bit
    "I;16 odd": (lambda: Image.fromarray(np.array([[0, 1000, 32768, 65535]] * 2, dtype=np.uint16)), ".png",
                 _expected_grey(np.array([[0, 4, 128, 255]] * 2, dtype=np.uint8))),  # round(v / 257)
    "I": (lambda: Image.fromarray(GREY.astype(np.int32) * 257), ".tif", _expected_grey(GREY)),
    "CMYK": (lambda: Image.frombytes("CMYK", (4, 2), np.dstack([GREY, GREY * 0, 255 - GREY, GREY * 0]).tobytes()),
             ".tif", np.dstack([255 - GREY, np.full_like(GREY, 255), GREY])),  # PIL: R = 255 - C, ...
}


def _palette() -> Image.Image:
    im = Image.fromarray(np.array([[0, 1, 2, 3]] * 2, dtype=np.uint8), mode="P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * (256 * 3 - 12))
    return im


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_decodes_to_the_rgb_it_means(tmp_path, name):
    make, suffix, expected = MODES[name]
    im = make()
    path = tmp_path / f"img{suffix}"
    im.save(path)
    with Image.open(path) as check:
        assert check.mode == name.split()[0]  # the file really is in that mode
    h, w = expected.shape[:2]
    from patchbench.data.cache import to_rgb

    with Image.open(path) as opened:
        assert np.array_equal(np.asarray(to_rgb(opened)), expected)
    out = decode_image(path, min(h, w))  # no resize: shorter side already the size, centre crop
    left = (w - min(h, w)) // 2
    assert np.array_equal(out, expected[:, left:left + min(h, w)])


@pytest.mark.parametrize("array", [np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32),
                                   np.array([[0, 70000], [5, 6]], dtype=np.int32)])
def test_pixels_without_an_rgb_reading_are_refused(tmp_path, array):
    """Refused by the decoder, so prepare skips and reports the file like a corrupt one (see the corrupt
    image test above) and predict says so in one line."""
    from patchbench.data.cache import UndecodableImage

    path = tmp_path / "deep.tif"
    Image.fromarray(array).save(path)
    with pytest.raises(UndecodableImage, match="no standard 8-bit reading"):
        decode_image(path, 2)


def test_a_16_bit_png_in_a_dataset_is_decoded_not_clipped(tmp_path):
    root = make_folder(tmp_path / "toy", size=(4, 4))
    Image.fromarray(np.full((4, 4), 1000, dtype=np.uint16)).save(root / "train" / WNIDS[0] / "deep.png")
    data = prepare(cfg_for(root, tmp_path, prepare_size=4), progress=False, workers=1)
    assert len(data.skipped) == 0 and len(data.train) == 10
    assert (np.asarray(data.train.images) == 4).all(axis=(1, 2, 3)).sum() == 1  # 1000 / 257, not 255
