"""Storage URIs through pyarrow.fs against an S3 server on loopback (moto): joining paths
before a query string, upload and download, "not found" versus every other error, and the
node-local cache that workers fetch references into (keyed and verified by checksum)."""
from __future__ import annotations

import pytest

from cbd_ray import storage as S


def test_uri_join_keeps_the_query_string_last():
    assert S.uri_join("s3://b/runs?endpoint_override=h%3A1&scheme=http", "smoke", "/models/a1/") == \
        "s3://b/runs/smoke/models/a1?endpoint_override=h%3A1&scheme=http"
    assert S.uri_join("/tmp/runs/", "x") == "/tmp/runs/x"
    assert S.redact("s3://b/p?secret_key=abc") == "s3://b/p?…"


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "m"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"a": 1}')
    (d / "model.safetensors").write_bytes(b"\x00" * 1000 + b"w")
    (d / "sub" / "x.txt").write_text("x")
    return d


def test_upload_download_roundtrip_and_absent_means_empty(s3_server, model_dir, tmp_path):
    uri = f"s3://cbd-runs/unit/roundtrip{s3_server}"
    S.delete_dir(uri)
    assert not S.uri_exists(uri) and S.download_dir(uri, tmp_path / "none") == 0
    assert S.upload_dir(model_dir, uri, exclude=("sub",)) == 2
    assert S.list_files(uri) == {"config.json": 8, "model.safetensors": 1001}
    assert S.download_dir(uri, tmp_path / "back") == 2
    assert S.dir_checksums(tmp_path / "back") == {k: v for k, v in S.dir_checksums(model_dir).items()
                                                   if not k.startswith("sub")}


def test_an_unreachable_storage_is_an_error_not_an_empty_run(tmp_path):
    from conftest import free_port

    dead = f"s3://cbd-runs/x?endpoint_override=127.0.0.1%3A{free_port()}&scheme=http&region=us-east-1"
    with pytest.raises(S.StorageError, match=r"s3://cbd-runs/x"):
        S.sync_down(dead, tmp_path / "mirror")
    assert not (tmp_path / "mirror").exists()


def test_materialize_fetches_once_per_node_and_verifies(s3_server, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CBD_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"s3://cbd-runs/unit/model{s3_server}"
    S.delete_dir(uri)
    S.upload_dir(model_dir, uri)
    ref = S.make_ref(uri, S.dir_checksums(model_dir), local=str(model_dir))
    got = S.materialize(ref)
    assert got.parent == tmp_path / "cache" and S.dir_checksums(got) == S.dir_checksums(model_dir)
    assert S.materialize(ref) == got  # cached: no second fetch
    assert S.materialize({**ref, "file": "config.json"}) == got / "config.json"

    # the object changes under the same checksums: the new fetch refuses it
    (model_dir / "model.safetensors").write_bytes(b"tampered")
    S.upload_dir(model_dir, uri)
    monkeypatch.setenv("CBD_CACHE_DIR", str(tmp_path / "cache2"))
    with pytest.raises(S.StorageError, match="does not match its recorded checksum"):
        S.materialize(ref)
    assert list((tmp_path / "cache2").glob("*")) == []  # nothing cached, no partial download left


def test_a_local_reference_is_used_in_place(model_dir):
    ref = S.make_ref(str(model_dir), S.dir_checksums(model_dir))
    assert S.materialize(ref) == model_dir and S.materialize(str(model_dir)) == model_dir
