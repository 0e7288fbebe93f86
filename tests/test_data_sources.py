"""Dataset sources: registry, folders, archives (safe extraction), download (resume, checksum)."""

import hashlib
import http.server
import io
import os
import tarfile
import threading
import zipfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from patchbench.data import imagenette as inet
from patchbench.data.imagenette import (
    DATASETS,
    default_cache_dir,
    download_file,
    list_images,
    resolve_source,
    safe_extract,
)
from patchbench.errors import UserError

WNIDS = ["n01440764", "n02102040", "n02979186"]


def make_folder(root: Path, per_class=(3, 2), wnids=WNIDS, size=(40, 30)) -> Path:
    """train/<wnid>/ and val/<wnid>/ with small random JPEGs."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for w in wnids:
            d = root / split / w
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{w}_{i}.JPEG", quality=90)
    return root


def make_tgz(folder: Path, out: Path, arcname="toy") -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return out


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_registry_has_the_issue_names_with_md5s():
    for name in ["imagenette-160", "imagenette-320", "imagenette", "imagewoof-160", "imagewoof-320", "imagewoof"]:
        d = DATASETS[name]
        assert d.url.startswith("https://") and d.url.endswith(".tgz")
        assert len(d.md5) == 32 and int(d.md5, 16) >= 0
    assert DATASETS["imagenette-160"].md5 == "e793b78cc4c9e9a4ccc0c1155377a412"  # torchvision's
    assert inet.class_name("n02102040") == "English springer"
    assert inet.class_name("n02096294") == "Australian terrier"
    assert inet.class_name("my_class") == "my_class"


def test_default_cache_dir_respects_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("PATCHBENCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "patchbench"
    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path / "pb"))
    assert default_cache_dir() == tmp_path / "pb"


def test_folder_source_is_used_in_place_and_parent_folder_accepted(tmp_path):
    root = make_folder(tmp_path / "data" / "toy")
    assert resolve_source(str(root), cache_dir=tmp_path / "c") == root
    assert resolve_source(str(tmp_path / "data"), cache_dir=tmp_path / "c") == root
    wnids, files = list_images(root)
    assert wnids == WNIDS and len(files["train"]) == 9 and len(files["val"]) == 6


def test_missing_val_and_empty_class_are_clear_errors(tmp_path):
    root = make_folder(tmp_path / "a")
    for f in (root / "val").rglob("*"):
        if f.is_file():
            f.unlink()
    for d in sorted((root / "val").iterdir()):
        d.rmdir()
    (root / "val").rmdir()
    with pytest.raises(UserError, match="missing val/"):
        resolve_source(str(root), cache_dir=tmp_path / "c")

    root = make_folder(tmp_path / "b")
    empty = root / "train" / "n09999999"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=r"empty class folder .*n09999999"):
        resolve_source(str(root), cache_dir=tmp_path / "c")


def test_unknown_source_names_the_registered_ones(tmp_path):
    with pytest.raises(UserError, match="imagenette-160"):
        resolve_source(str(tmp_path / "nope"), cache_dir=tmp_path / "c")


def test_archive_extracted_once_with_md5_check(tmp_path, capsys):
    archive = make_tgz(make_folder(tmp_path / "src"), tmp_path / "toy.tgz")
    root = resolve_source(str(archive), cache_dir=tmp_path / "c", md5=md5(archive))
    assert (root / "train" / WNIDS[0]).is_dir() and root.name == "toy"
    assert "extracting" in capsys.readouterr().err
    marker_mtime = (root.parent / inet.EXTRACTED_MARKER).stat().st_mtime_ns
    assert resolve_source(str(archive), cache_dir=tmp_path / "c", md5=md5(archive)) == root
    assert "extracting" not in capsys.readouterr().err  # second call: nothing done
    assert (root.parent / inet.EXTRACTED_MARKER).stat().st_mtime_ns == marker_mtime
    with pytest.raises(UserError, match="MD5 mismatch"):
        resolve_source(str(archive), cache_dir=tmp_path / "c", md5="0" * 32)


def test_zip_archive(tmp_path):
    src = make_folder(tmp_path / "src")
    archive = tmp_path / "toy.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(src.rglob("*")):
            zf.write(f, Path("toy") / f.relative_to(src))
    root = resolve_source(str(archive), cache_dir=tmp_path / "c")
    assert len(list((root / "val").rglob("*.JPEG"))) == 6


def test_truncated_archive_is_a_clear_error(tmp_path):
    archive = make_tgz(make_folder(tmp_path / "src"), tmp_path / "toy.tgz")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        resolve_source(str(archive), cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c" / "extracted").glob("*/*"))  # nothing half-extracted left


def _tar_with(tmp_path, member: tarfile.TarInfo, data=b"") -> Path:
    out = tmp_path / "evil.tar"
    with tarfile.open(out, "w") as tar:
        tar.addfile(member, io.BytesIO(data) if data else None)
    return out


def test_path_traversal_member_is_refused(tmp_path):
    info = tarfile.TarInfo("../escaped.txt")
    info.size = 3
    archive = _tar_with(tmp_path, info, b"bad")
    with pytest.raises(UserError, match="outside the target"):
        safe_extract(archive, tmp_path / "target")
    assert not (tmp_path / "escaped.txt").exists()
    info = tarfile.TarInfo("/tmp/abs.txt")
    info.size = 3
    with pytest.raises(UserError, match="outside the target"):
        safe_extract(_tar_with(tmp_path, info, b"bad"), tmp_path / "target")


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_links_and_devices_are_refused(tmp_path, kind):
    info = tarfile.TarInfo("toy/thing")
    info.type = kind
    info.linkname = "/etc/passwd"
    with pytest.raises(UserError, match="refusing"):
        safe_extract(_tar_with(tmp_path, info), tmp_path / "target")


def test_zip_traversal_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../escaped.txt", "bad")
    with pytest.raises(UserError, match="outside the target"):
        safe_extract(archive, tmp_path / "target")


# ----------------------------------------------------------------------------- download


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `payload`, honouring `Range: bytes=N-`, and records the Range headers it saw."""

    payload = b""
    ranges: ClassVar[list] = []
    honour_range = True

    def do_GET(self):
        rng = self.headers.get("Range")
        type(self).ranges.append(rng)
        if not self.honour_range:
            rng = None
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        if start >= len(self.payload):
            self.send_response(416)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.payload[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.payload = os.urandom(300_000)
    _Handler.ranges = []
    _Handler.honour_range = True
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/file.tgz", _Handler
    httpd.shutdown()
    httpd.server_close()


def test_download_resumes_with_range_and_verifies(server, tmp_path):
    url, handler = server
    dest = tmp_path / "file.tgz"
    part = tmp_path / "file.tgz.part"
    part.write_bytes(handler.payload[:123_456])  # an interrupted earlier attempt
    out = download_file(url, dest, hashlib.md5(handler.payload).hexdigest(), progress=False)
    assert out == dest and dest.read_bytes() == handler.payload
    assert handler.ranges == ["bytes=123456-"] and not part.exists()


def test_download_restarts_when_server_ignores_range_and_accepts_complete_part(server, tmp_path):
    url, handler = server
    good = hashlib.md5(handler.payload).hexdigest()
    part = tmp_path / "a.tgz.part"
    part.write_bytes(b"garbage that is not a prefix")
    handler.honour_range = False  # answers 200 with the whole file: start over, do not append
    assert download_file(url, tmp_path / "a.tgz", good, progress=False).read_bytes() == handler.payload
    handler.honour_range = True
    (tmp_path / "b.tgz.part").write_bytes(handler.payload)  # complete already: the server says 416
    assert download_file(url, tmp_path / "b.tgz", good, progress=False).read_bytes() == handler.payload
    assert handler.ranges[-1] == f"bytes={len(handler.payload)}-"


def test_download_checksum_mismatch_removes_partial(server, tmp_path):
    url, _handler = server
    dest = tmp_path / "file.tgz"
    with pytest.raises(UserError, match=r"MD5 mismatch.*partial download .* was removed"):
        download_file(url, dest, "0" * 32, progress=False)
    assert not dest.exists() and not (tmp_path / "file.tgz.part").exists()


def test_registered_name_downloads_extracts_and_reuses(server, tmp_path, monkeypatch):
    url, handler = server
    archive = make_tgz(make_folder(tmp_path / "src"), tmp_path / "toy.tgz", arcname="toy2")
    handler.payload = archive.read_bytes()
    monkeypatch.setitem(DATASETS, "toy", inet.RegisteredDataset("toy", url, md5(archive)))
    with pytest.raises(UserError, match="not downloaded yet"):
        resolve_source("toy", cache_dir=tmp_path / "c", download=False)
    root = resolve_source("toy", cache_dir=tmp_path / "c", progress=False)
    assert root.name == "toy2" and (root / "train").is_dir()
    assert (tmp_path / "c" / "downloads" / "file.tgz").exists()
    assert resolve_source("toy", cache_dir=tmp_path / "c", download=False) == root
    assert len(handler.ranges) == 1  # served once


def test_zip_symlink_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    info = zipfile.ZipInfo("toy/link")
    info.create_system = 3
    info.external_attr = (0o120777) << 16  # S_IFLNK
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UserError, match="link or special file"):
        safe_extract(archive, tmp_path / "target")
