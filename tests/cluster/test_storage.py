"""Storage: local writes are atomic (a crash leaves nothing, nothing is overwritten unless
asked), checksums see a changed file, an unwritable root is reported. URIs go through
pyarrow.fs against an S3 server on loopback (moto): paths join before a query string, files
go up and down, "not found" differs from every other error, and workers fetch references into
a node-local cache, keyed and verified by checksum."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cbd_ray import storage as S


def test_atomic_directory_leaves_nothing_on_failure(tmp_path: Path):
    final = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with S.atomic_directory(final) as tmp:
            (tmp / "weights").write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_refuses_to_overwrite_unless_asked(tmp_path: Path):
    final = tmp_path / "model"
    with S.atomic_directory(final) as tmp:
        (tmp / "a").write_text("first")
    with pytest.raises(FileExistsError):
        with S.atomic_directory(final) as tmp:
            (tmp / "a").write_text("second")
    assert (final / "a").read_text() == "first"
    with S.atomic_directory(final, overwrite=True) as tmp:
        (tmp / "a").write_text("second")
    assert (final / "a").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_checksums_detect_a_changed_file(tmp_path: Path):
    (tmp_path / "x").write_bytes(b"abc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "y").write_bytes(b"def")
    sums = S.dir_checksums(tmp_path)
    assert set(sums) == {"x", os.path.join("sub", "y")}
    assert S.verify_checksums(tmp_path, sums) == []
    (tmp_path / "x").write_bytes(b"abd")
    assert S.verify_checksums(tmp_path, sums) == ["x"]


def test_atomic_write_json_replaces_whole_file(tmp_path: Path):
    p = tmp_path / "m.json"
    S.atomic_write_json(p, {"a": 1})
    S.atomic_write_json(p, {"b": 2})
    assert p.read_text().strip() == '{\n  "b": 2\n}'


def test_unwritable_storage_root_is_reported(tmp_path: Path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: use a path under a file instead
            target = tmp_path / "file"
            target.write_text("x")
            with pytest.raises(PermissionError, match="cannot be written"):
                S.check_writable(target / "run")
        else:
            with pytest.raises(PermissionError, match="cannot be written"):
                S.check_writable(ro / "run")
    finally:
        ro.chmod(0o700)


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
