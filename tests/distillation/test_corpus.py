"""Token corpora (cbd_ray.corpus): text tokenised once into shards of fixed-length blocks,
reused by key, and streamed per worker without replacement, resumable at any sample."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cbd_ray.corpus import LMOPS_NEWLINE, TokenStream, build_corpus, read_index
from cbd_ray.errors import CBDError

DOCS = [f"Document {i} talks about topic {i % 7}.{LMOPS_NEWLINE}It has a second line, number {i}." for i in range(300)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(d)
    return d


def _txt(tmp_path, docs=DOCS):
    p = tmp_path / "data.txt"
    p.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return p


def _all_rows(ref) -> np.ndarray:
    s = TokenStream(ref, 0, 1, seed=0, chunk_rows=10**9)
    return s._read_rows(0, ref["index"]["rows"])


def test_txt_is_one_document_per_line_with_lmops_newlines_restored(tmp_path, tok_dir, tokenizer):
    ref = build_corpus(str(_txt(tmp_path)), tok_dir, 16, str(tmp_path / "corpora"), use_ray=False)
    idx = ref["index"]
    assert idx["docs"] == len(DOCS) and idx["block_len"] == 16
    flat = _all_rows(ref).reshape(-1).tolist()
    assert idx["rows"] * 16 + idx["dropped_tokens"] == idx["tokens"]
    text = tokenizer.decode(flat)
    assert LMOPS_NEWLINE not in text and "\nIt has a second line" in text
    # one EOS closes each document
    eos = tokenizer.eos_token_id
    expected = [t for d in DOCS for t in (*tokenizer(d.replace(LMOPS_NEWLINE, "\n"), add_special_tokens=False)["input_ids"], eos)]
    assert flat == expected[:len(flat)]


def test_jsonl_and_parquet_give_the_blocks_of_the_same_text(tmp_path, tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    plain = [d.replace(LMOPS_NEWLINE, "\n") for d in DOCS]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in plain))
    pq.write_table(pa.table({"text": plain}), tmp_path / "d.parquet")
    refs = [build_corpus(str(p), tok_dir, 16, str(tmp_path / "c"), use_ray=False)
            for p in (_txt(tmp_path), tmp_path / "d.jsonl", tmp_path / "d.parquet")]
    assert len({r["index"]["key"] for r in refs}) == 3  # keyed by the source's checksum
    first = _all_rows(refs[0])
    for r in refs[1:]:
        assert np.array_equal(_all_rows(r), first)


def test_a_finished_corpus_is_reused_and_an_unfinished_one_rebuilt(tmp_path, tok_dir):
    src, root = _txt(tmp_path), str(tmp_path / "corpora")
    said = []
    a = build_corpus(str(src), tok_dir, 16, root, use_ray=False, say=said.append)
    b = build_corpus(str(src), tok_dir, 16, root, use_ray=False, say=said.append)
    assert a == b and "reusing" in said[-1]
    assert build_corpus(str(src), tok_dir, 32, root, use_ray=False)["uri"] != a["uri"]  # block length is in the key
    (tmp_path / "corpora" / a["index"]["key"] / "index.json").unlink()
    assert read_index(a["uri"]) is None
    c = build_corpus(str(src), tok_dir, 16, root, use_ray=False, say=said.append)
    assert c["index"] == a["index"] and "reusing" not in said[-1]


def _numbered(tmp_path, n: int, sizes=(37, 100, 63)) -> dict:
    """A corpus whose block i is filled with i, in shards of the given sizes."""
    files, start = [], 0
    for k, rows in enumerate(sizes):
        data = np.repeat(np.arange(start, start + rows, dtype="<u2"), 4)
        (tmp_path / f"s{k}.bin").write_bytes(data.tobytes())
        files.append({"name": f"s{k}.bin", "rows": rows, "sha256": ""})
        start += rows
    assert start == n
    return {"uri": str(tmp_path), "index": {"block_len": 4, "dtype": "uint16", "rows": n, "files": files}}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_epoch_visits_every_block_at_most_once_and_workers_never_share(tmp_path, world):
    n = 200
    ref = _numbered(tmp_path, n)
    seen = []
    for rank in range(world):
        s = TokenStream(ref, rank, world, seed=3, chunk_rows=16)
        epoch_len = s._epoch_len(0)
        block = s.take(epoch_len)
        assert (block == block[:, :1]).all()
        got = block[:, 0].tolist()
        assert len(set(got)) == len(got)  # no replacement within the epoch
        seen.append(set(got))
        assert s._buf[1].shape[0] <= 16  # one chunk in memory
    assert sum(len(x) for x in seen) == len(set().union(*seen))  # disjoint shares
    assert len(set().union(*seen)) >= n - world * 16  # at most the leftover chunks wait for a later epoch


def test_seek_resumes_at_the_exact_sample(tmp_path):
    ref = _numbered(tmp_path, 200)
    whole = TokenStream(ref, 1, 2, seed=5, chunk_rows=8).take(1000)  # several epochs
    again = TokenStream(ref, 1, 2, seed=5, chunk_rows=8)
    again.seek(437)
    assert np.array_equal(again.take(300), whole[437:737])
    e0 = again._epoch_len(0)
    first, second = whole[:e0, 0].tolist(), whole[e0:2 * e0, 0].tolist()
    assert first != second and len(set(first)) == e0  # each epoch its own order


def test_bad_sources_fail_in_one_line(tmp_path, tok_dir):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(CBDError, match=r"suffix '.csv'; allowed: .txt, .jsonl, .parquet"):
        build_corpus(str(tmp_path / "x.csv"), tok_dir, 8, str(tmp_path / "c"), use_ray=False)
    (tmp_path / "x.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(CBDError, match=r"x.jsonl: a record needs a string field 'text'"):
        build_corpus(str(tmp_path / "x.jsonl"), tok_dir, 8, str(tmp_path / "c"), use_ray=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_corpus(str(tmp_path / "missing.txt"), tok_dir, 8, str(tmp_path / "c"), use_ray=False)
    (tmp_path / "short.txt").write_text("two words\n")
    with pytest.raises(CBDError, match="not one block of 64"):
        build_corpus(str(tmp_path / "short.txt"), tok_dir, 64, str(tmp_path / "c"), use_ray=False)


def test_corpus_on_object_storage_is_built_and_streamed_with_range_reads(tmp_path, tok_dir, s3_server):
    from cbd_ray.storage import list_files, upload_file

    src = f"s3://cbd-runs/corpus-src/data.txt{s3_server}"
    upload_file(_txt(tmp_path), src)
    ref = build_corpus(src, tok_dir, 16, f"s3://cbd-runs/corpus-run/corpora{s3_server}", use_ray=False)
    assert "index.json" in list_files(ref["uri"])
    local = build_corpus(str(_txt(tmp_path)), tok_dir, 16, str(tmp_path / "c"), use_ray=False)
    assert ref["index"]["key"] == local["index"]["key"]  # same bytes, same tokenizer, same length
    a, b = TokenStream(ref, 0, 2, seed=1, chunk_rows=4), TokenStream(local, 0, 2, seed=1, chunk_rows=4)
    assert np.array_equal(a.take(50), b.take(50))


@pytest.mark.ray
def test_ray_data_actors_write_the_same_blocks_as_the_plain_path(tmp_path, tok_dir, ray_clean):
    src = _txt(tmp_path, DOCS * 4)
    plain = build_corpus(str(src), tok_dir, 16, str(tmp_path / "plain"), use_ray=False, docs_per_batch=400)
    ray_ref = build_corpus(str(src), tok_dir, 16, str(tmp_path / "ray"), use_ray=True, actors=1, docs_per_batch=400)
    assert ray_ref["index"]["key"] == plain["index"]["key"]
    # batches may be cut elsewhere by Ray Data: the same documents, packed per batch
    assert ray_ref["index"]["docs"] == plain["index"]["docs"] == 4 * len(DOCS)
    assert abs(ray_ref["index"]["rows"] - plain["index"]["rows"]) <= len(ray_ref["index"]["files"])
    assert ray_ref["index"]["tokens"] == plain["index"]["tokens"]
    # every block the actors wrote is a run of the text's own token stream (docs + EOS)
    stream = _all_rows(build_corpus(str(src), tok_dir, 16, str(tmp_path / "one"), use_ray=False,
                                    docs_per_batch=10**6)).astype("<u2").tobytes()
    assert all(stream.find(r.astype("<u2").tobytes()) % 2 == 0 for r in _all_rows(ray_ref))


@pytest.mark.parametrize("range_bytes", [1, 7, 100, 10**6])
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_byte_ranges_give_every_line_exactly_once(tmp_path, range_bytes, trailing_newline):
    """The Ray Data build reads a text file as byte ranges: whatever the range size, every
    line comes out once, in order, however long the lines."""
    import random

    import pyarrow.fs as pafs

    from cbd_ray.corpus import range_lines, text_ranges

    rng = random.Random(range_bytes)
    lines = [("x" * rng.randint(0, 300)) + str(i) for i in range(800)]
    p = tmp_path / "t.txt"
    p.write_text("\n".join(lines) + ("\n" if trailing_newline else ""))
    got = [ln for r in text_ranges(str(p), range_bytes)
           for ln in range_lines(pafs.LocalFileSystem(), str(p), r["start"], r["end"])]
    assert got == lines


@pytest.mark.ray
def test_ray_data_actors_write_shards_into_object_storage(tmp_path, tok_dir, s3_server, ray_clean):
    """On object storage the actors write the shards and the driver only the index: the text
    and the corpus both live in the bucket, and a worker streams from it with range reads."""
    from cbd_ray.storage import list_files, upload_file

    # credentials in the URI: this session's Ray workers may have started before the S3 server
    bucket = "s3://testing:testing@cbd-runs/corpus-ray"
    src = f"{bucket}/data.txt{s3_server}"
    upload_file(_txt(tmp_path, DOCS * 2), src)
    ref = build_corpus(src, tok_dir, 16, f"{bucket}/corpora{s3_server}", use_ray=True, actors=1)
    files = list_files(ref["uri"])
    assert "index.json" in files and all(f["name"] in files for f in ref["index"]["files"])
    got = TokenStream(ref, 1, 2, seed=0, chunk_rows=8).take(40)
    assert got.shape == (40, 16) and ref["index"]["docs"] == 2 * len(DOCS)
