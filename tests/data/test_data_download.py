import hashlib
import io

import pytest

from matrec.data import download
from matrec.data.download import DataFile, DataFileError, fetch
from support import SHAKESPEARE_FILE


def _spec(tmp_path, payload: bytes, env=None) -> DataFile:
    source = tmp_path / "remote" / "data.txt"
    source.parent.mkdir()
    source.write_bytes(payload)
    return DataFile(name="data.txt", urls=(source.as_uri(),), sha256=hashlib.sha256(payload).hexdigest(),
                    size=len(payload), env=env)


def test_downloads_from_file_url_into_cache_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("MATREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MATREC_OFFLINE", raising=False)
    spec = _spec(tmp_path, b"hello matrec\n")
    path = fetch(spec)
    assert path == tmp_path / "cache" / "data.txt" and path.read_bytes() == b"hello matrec\n"
    assert [p.name for p in path.parent.iterdir()] == ["data.txt"]   # no temporary file left behind


def test_cached_file_is_reused_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("MATREC_CACHE", str(tmp_path / "cache"))
    spec = _spec(tmp_path, b"abc")
    fetch(spec)
    monkeypatch.setattr(download, "_urlopen", lambda url: pytest.fail("must not download again"))
    assert fetch(spec).read_bytes() == b"abc"


def test_corrupt_cached_file_is_an_error_not_a_silent_redownload(tmp_path, monkeypatch):
    monkeypatch.setenv("MATREC_CACHE", str(tmp_path / "cache"))
    spec = _spec(tmp_path, b"abc")
    fetch(spec).write_bytes(b"abX")
    monkeypatch.setattr(download, "_urlopen", lambda url: pytest.fail("must not download again"))
    with pytest.raises(DataFileError) as err:
        fetch(spec)
    msg = str(err.value)
    assert "data.txt" in msg and spec.sha256 in msg and hashlib.sha256(b"abX").hexdigest() in msg
    assert "Delete" in msg


def test_corrupt_download_never_reaches_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MATREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MATREC_OFFLINE", raising=False)
    spec = _spec(tmp_path, b"abc")
    monkeypatch.setattr(download, "_urlopen", lambda url: io.BytesIO(b"tampered"))
    with pytest.raises(DataFileError, match="expected " + spec.sha256):
        fetch(spec)
    assert list((tmp_path / "cache").iterdir()) == []


def test_offline_without_file_says_how_to_supply_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MATREC_CACHE", str(tmp_path / "cache"))
    spec = _spec(tmp_path, b"abc", env="MATREC_TESTFILE")
    monkeypatch.delenv("MATREC_TESTFILE", raising=False)
    monkeypatch.setenv("MATREC_OFFLINE", "1")
    with pytest.raises(DataFileError, match="MATREC_TESTFILE") as err:
        fetch(spec)
    assert str(tmp_path / "cache" / "data.txt") in str(err.value)
    # No network at all (unreachable address) gives the same advice.
    monkeypatch.delenv("MATREC_OFFLINE")
    unreachable = DataFile(name="data.txt", urls=((tmp_path / "nowhere.txt").as_uri(),), sha256=spec.sha256,
                           size=3, env="MATREC_TESTFILE")
    with pytest.raises(DataFileError, match="could not download data.txt.*set MATREC_TESTFILE"):
        fetch(unreachable)


def test_path_and_env_override_cache_and_are_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("MATREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MATREC_OFFLINE", "1")
    spec = _spec(tmp_path, b"abc", env="MATREC_TESTFILE")
    local = tmp_path / "mine.txt"
    local.write_bytes(b"abc")
    assert fetch(spec, local) == local
    monkeypatch.setenv("MATREC_TESTFILE", str(local))
    assert fetch(spec) == local
    local.write_bytes(b"abd")
    with pytest.raises(DataFileError, match=r"\$MATREC_TESTFILE"):
        fetch(spec)
    with pytest.raises(DataFileError, match="does not exist"):
        fetch(spec, tmp_path / "missing.txt")


@pytest.mark.skipif(not SHAKESPEARE_FILE.exists(), reason="shared/data/tinyshakespeare.txt not beside the repo")
def test_shakespeare_spec_matches_the_reference_file():
    assert SHAKESPEARE_FILE.stat().st_size == download.SHAKESPEARE.size
    assert fetch(download.SHAKESPEARE, SHAKESPEARE_FILE) == SHAKESPEARE_FILE


def test_connection_dropped_mid_download_tries_the_next_address(tmp_path, monkeypatch):
    import http.client

    monkeypatch.setenv("MATREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MATREC_OFFLINE", raising=False)
    good = _spec(tmp_path, b"intact payload\n")
    spec = DataFile(name=good.name, urls=("https://broken.example/data.txt", good.urls[0]),
                    sha256=good.sha256, size=good.size)

    class Dropped(io.BytesIO):
        def read(self, *args):
            raise http.client.IncompleteRead(b"intact")

    real = download._urlopen
    monkeypatch.setattr(download, "_urlopen",
                        lambda url: Dropped() if url.startswith("https://broken") else real(url))
    path = fetch(spec)
    assert path.read_bytes() == b"intact payload\n"
    assert [p.name for p in path.parent.iterdir()] == ["data.txt"]
