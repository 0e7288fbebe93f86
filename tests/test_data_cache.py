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

    import patchbench.data.cache as cache

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
