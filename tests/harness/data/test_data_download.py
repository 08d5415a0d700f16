"""download_dataset against a local HTTP server on 127.0.0.1."""

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import threading
from dataclasses import replace
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from sharpness.harness.data import download_dataset, load_dataset
from sharpness.harness.data.catalog import SPECS, RemoteFile
from sharpness.harness.data.download import file_md5


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        self.server.requested.append(self.path)


@pytest.fixture
def server(tmp_path, monkeypatch):
    """(folder served, base URL, list of requested paths)."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    served = tmp_path / "served"
    served.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(served)))
    httpd.requested = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}", httpd.requested
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _md5(payload):
    return hashlib.md5(payload).hexdigest()


def _cifar10_tarball():
    images = np.arange(6 * 32 * 32 * 3, dtype=np.int64).reshape(6, 32, 32, 3).astype(np.uint8)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for i, name in enumerate(names):
            rows = images[i : i + 1].transpose(0, 3, 1, 2).reshape(1, 3072)
            payload = pickle.dumps({b"data": rows, b"labels": [i]}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return images, buffer.getvalue()


def _serve_cifar10(served, monkeypatch, md5=None):
    images, tarball = _cifar10_tarball()
    (served / "cifar-10-python.tar.gz").write_bytes(tarball)
    remote = RemoteFile("cifar-10-python.tar.gz", md5 or _md5(tarball))
    monkeypatch.setitem(SPECS, "cifar10", replace(SPECS["cifar10"], remote=(remote,)))
    return images, tarball


def test_download_verifies_and_places_file(tmp_path, server, monkeypatch):
    served, url, requested = server
    images, tarball = _serve_cifar10(served, monkeypatch)
    target = tmp_path / "data"
    paths = download_dataset("cifar10", target, base_url=url)
    assert paths == [target / "cifar-10-python.tar.gz"]
    assert paths[0].read_bytes() == tarball
    assert sorted(p.name for p in target.iterdir()) == ["cifar-10-python.tar.gz"]
    assert requested == ["/cifar-10-python.tar.gz"]
    data = load_dataset("cifar10", target)
    np.testing.assert_array_equal(data.x_train, images[:5])
    assert data.y_test.tolist() == [5]
    assert download_dataset("cifar10", target, base_url=url + "/") == paths
    assert requested == ["/cifar-10-python.tar.gz"]


def test_load_dataset_downloads_when_asked(tmp_path, server, monkeypatch):
    served, url, _ = server
    images, _ = _serve_cifar10(served, monkeypatch)
    monkeypatch.setitem(SPECS, "cifar10", replace(SPECS["cifar10"], mirrors=(url,)))
    with pytest.raises(FileNotFoundError):
        load_dataset("cifar10", tmp_path / "data")
    data = load_dataset("cifar10", tmp_path / "data", download=True)
    np.testing.assert_array_equal(data.x_test, images[5:])


def test_checksum_mismatch_deletes_download_and_reports_both_sums(tmp_path, server, monkeypatch):
    served, url, _ = server
    wrong = "0" * 32
    _, tarball = _serve_cifar10(served, monkeypatch, md5=wrong)
    target = tmp_path / "data"
    with pytest.raises(ValueError) as caught:
        download_dataset("cifar10", target, base_url=url)
    message = str(caught.value)
    assert f"expected md5 {wrong}, got {_md5(tarball)}" in message
    assert f"{url}/cifar-10-python.tar.gz" in message
    assert list(target.iterdir()) == []


def test_corrupt_existing_file_is_replaced(tmp_path, server, monkeypatch):
    served, url, requested = server
    _, tarball = _serve_cifar10(served, monkeypatch)
    target = tmp_path / "data"
    target.mkdir()
    (target / "cifar-10-python.tar.gz").write_bytes(tarball[:100])
    download_dataset("cifar10", target, base_url=url)
    assert (target / "cifar-10-python.tar.gz").read_bytes() == tarball
    assert requested == ["/cifar-10-python.tar.gz"]


def test_mnist_files_go_to_their_subfolder(tmp_path, server, monkeypatch):
    served, url, _ = server
    images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28).astype(np.uint8)
    payloads = {
        "train-images-idx3-ubyte.gz": struct.pack(">IIII", 2051, 2, 28, 28) + images.tobytes(),
        "train-labels-idx1-ubyte.gz": struct.pack(">II", 2049, 2) + bytes([1, 2]),
        "t10k-images-idx3-ubyte.gz": struct.pack(">IIII", 2051, 1, 28, 28) + images[:1].tobytes(),
        "t10k-labels-idx1-ubyte.gz": struct.pack(">II", 2049, 1) + bytes([8]),
    }
    remote = []
    for name, payload in payloads.items():
        compressed = gzip.compress(payload)
        (served / name).write_bytes(compressed)
        remote.append(RemoteFile(name, _md5(compressed), "mnist"))
    monkeypatch.setitem(SPECS, "mnist", replace(SPECS["mnist"], remote=tuple(remote)))
    paths = download_dataset("mnist", tmp_path, base_url=url)
    assert paths == [tmp_path / "mnist" / name for name in payloads]
    assert [file_md5(p) for p in paths] == [r.md5 for r in remote]
    data = load_dataset("mnist", tmp_path)
    np.testing.assert_array_equal(data.x_train[..., 0], images)
    assert data.y_train.tolist() == [1, 2] and data.y_test.tolist() == [8]


def test_missing_remote_file_is_an_os_error(tmp_path, server, monkeypatch):
    _, url, _ = server
    monkeypatch.setitem(
        SPECS, "svhn", replace(SPECS["svhn"], remote=(RemoteFile("train_32x32.mat", "0" * 32, "svhn"),))
    )
    with pytest.raises(OSError, match=r"could not download train_32x32\.mat: .*404"):
        download_dataset("svhn", tmp_path, base_url=url)
    assert list((tmp_path / "svhn").iterdir()) == []


def test_official_table_and_embedded_digits():
    assert [r.md5 for r in SPECS["cifar10"].remote] == ["c58f30108f718f92721af3b95e74349a"]
    assert [r.md5 for r in SPECS["cifar100"].remote] == ["eb9058c3a382ffc7106e4002c42a8d85"]
    assert [r.md5 for r in SPECS["svhn"].remote] == [
        "e26dedcc434d2e4c54c9b2d4a06d8373",
        "eb5a983be6a315427106f1b164d9cef3",
    ]
    assert [(r.filename, r.md5, r.subdir) for r in SPECS["svhn_extra"].remote] == [
        ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373", "svhn"),
        ("extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7", "svhn"),
        ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3", "svhn"),
    ]
    assert [r.md5 for r in SPECS["mnist"].remote] == [
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "d53e105ee54ea40749a09fcbcd1e9432",
        "9fb629c4189551a2d022fa330f9573f3",
        "ec29112dd5afa0611ce80d1b7f02629c",
    ]
    assert [r.md5 for r in SPECS["fashion_mnist"].remote] == [
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79",
        "bb300cfdad3c16e7a12a480ee83cd310",
    ]
    assert download_dataset("digits", None) == []
