"""Token corpora: plain text tokenised once per run by Ray Data, streamed by every worker.

A pretraining corpus (MiniLLM's ``lm_data``) can be far larger than any process's memory:
LMOps' OpenWebText is about 5 B tokens. So no process ever holds it whole:

1. :func:`build_corpus` (driver) reads the source with Ray Data from a local path or any
   URI ``pyarrow.fs`` opens, tokenises and packs it into fixed-length blocks in a pool of
   :class:`PackShards` actors, and each actor writes its blocks straight into the run
   directory as raw token shards (``blk-<sha>.bin``). The driver only collects each shard's
   name and row count and writes ``index.json`` last, so a corpus without an index is
   unfinished and is built again. The folder is keyed by the source's checksum, the
   tokenizer and the block length (:func:`corpus_key`): every chain step, a rerun and a
   second driver find it and reuse it.
2. :class:`TokenStream` (worker) reads only this worker's share, one chunk of rows at a time
   (range reads, a bounded buffer), in an order that is a deterministic function of
   (seed, epoch, rank, world): every epoch visits each block at most once (no replacement),
   and :meth:`TokenStream.seek` jumps to any position, so a resumed worker continues at the
   exact sample.

Sources: ``.txt`` (one document per line; LMOps' ``data.txt`` encodes a document's own
newlines as ``<@x(x!>``, turned back into newlines), ``.jsonl`` (a string ``text`` per line),
``.parquet`` (a ``text`` column). Each document is followed by EOS; documents are concatenated
and cut into blocks of ``block_len`` tokens; the tail of each actor batch that does not fill a
block is dropped (counted in the index as ``dropped_tokens``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cbd_ray.errors import CBDError

log = logging.getLogger(__name__)

FORMAT = "cbd-token-shards/1"
INDEX = "index.json"
LMOPS_NEWLINE = "<@x(x!>"  # LMOps minillm/tools/process_data_pretrain.py writes newlines as this
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                    "special_tokens_map.json", "tokenizer.model", "vocab.txt")
_CHUNK = 1 << 20


# ------------------------------------------------------------------------------ identity


def source_checksum(source: str) -> str:
    """sha256 of a local file or a URI's object, streamed (the corpus is never held whole)."""
    from cbd_ray.storage import StorageError, filesystem, redact, uri_exists

    if not uri_exists(source):  # only "not found" is a missing source; other errors stop (StorageError)
        raise FileNotFoundError(f"text corpus {redact(source)!r} not found")
    fs, path = filesystem(source)
    h = hashlib.sha256()
    try:
        with fs.open_input_stream(path) as f:
            while b := f.read(_CHUNK):
                h.update(b)
    except OSError as exc:
        raise StorageError(f"text corpus {redact(source)} cannot be read: {exc}") from exc
    return h.hexdigest()


def tokenizer_identity(tokenizer_ref: Any) -> str:
    """A hash of the tokenizer's files (from a storage reference's recorded checksums, or
    from the files of a local model directory): two models sharing a tokenizer share it."""
    from cbd_ray.storage import file_sha256

    if isinstance(tokenizer_ref, dict):
        sums = {k: v for k, v in tokenizer_ref["checksums"].items() if Path(k).name in _TOKENIZER_FILES}
    else:
        d = Path(tokenizer_ref)
        sums = {n: file_sha256(d / n) for n in _TOKENIZER_FILES if (d / n).is_file()}
    if not sums:
        raise CBDError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...) beside the model")
    return hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()[:16]


def corpus_key(source_sha: str, tokenizer_id: str, block_len: int) -> str:
    """The folder name of a token corpus: what it was cut from, by which tokenizer, how long."""
    return hashlib.sha256(f"{FORMAT}|{source_sha}|{tokenizer_id}|{block_len}".encode()).hexdigest()[:20]


def check_text_source(source: str) -> None:
    from cbd_ray.storage import redact, split_uri

    suffix = Path(split_uri(source)[0]).suffix
    if suffix not in TEXT_SUFFIXES:
        raise CBDError(f"text corpus {redact(source)!r} has suffix {suffix or '(none)'!r}; allowed: "
                       f"{', '.join(TEXT_SUFFIXES)} (.txt: one document per line)")


# ------------------------------------------------------------------------------ building


def _documents(batch: dict[str, Any], kind: str, where: str) -> list[str]:
    """The documents of one Ray Data batch of a ``.txt`` / ``.jsonl`` / ``.parquet`` source."""
    if kind == ".parquet":
        if "text" not in batch:
            raise CBDError(f"{where}: a Parquet corpus needs a 'text' column (has {sorted(batch)})")
        return [str(t) for t in batch["text"] if t is not None and str(t).strip()]
    lines = [str(t) for t in batch["text"]]
    if kind == ".txt":
        return [ln.replace(LMOPS_NEWLINE, "\n") for ln in lines if ln.strip()]
    docs = []
    for ln in lines:
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError as exc:
            raise CBDError(f"{where}: a line is not valid JSON ({exc.msg}): {ln[:60]!r}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise CBDError(f"{where}: a record needs a string field 'text': {ln[:60]!r}")
        docs.append(rec["text"])
    return docs


def text_ranges(source: str, range_bytes: int = 8 << 20) -> list[dict[str, int]]:
    """Byte ranges ``[start, end)`` of a line-based source (``.txt``, ``.jsonl``): each line
    belongs to the range it starts in (:func:`range_lines`), so ranges split a file of any
    size into tasks of bounded memory without reading it first."""
    from cbd_ray.storage import filesystem

    fs, path = filesystem(source)
    size = fs.get_file_info(path).size
    return [{"start": a, "end": min(a + range_bytes, size)} for a in range(0, max(size, 1), range_bytes)]


def range_lines(fs: Any, path: str, start: int, end: int) -> list[str]:
    """The lines that start in ``[start, end)`` of a UTF-8 file (range reads: a line that
    crosses ``end`` is read on to its newline; one that started before ``start`` is skipped)."""
    with fs.open_input_file(path) as f:
        size = f.size()
        lo = max(0, start - 1)
        data = bytearray(f.read_at(end - lo, lo))
        pos = end
        while pos < size and not data.endswith(b"\n"):
            more = f.read_at(min(1 << 16, size - pos), pos)
            cut = more.find(b"\n")
            data += more[: cut + 1] if cut >= 0 else more
            pos += cut + 1 if cut >= 0 else len(more)
            if cut >= 0:
                break
    if start > 0:  # the byte before ``start`` decides: the line in progress belongs to the range before
        data = data[data.find(b"\n") + 1:] if b"\n" in data else bytearray()
    return data.decode("utf-8").splitlines()


class PackShards:
    """``map_batches`` callable: tokenise documents with the tokenizer's own batch encoding,
    append EOS to each, cut into ``[n, block_len]`` blocks and write them as one shard file
    into ``out_uri``. A batch is either byte ranges (``start``/``end`` of a ``.txt`` or
    ``.jsonl`` source, read here) or Parquet rows (``text``). Returns one metadata row per
    shard (name, rows, sha256, tokens, dropped tail); blocks never travel through the object
    store, and one range (a few MB of text) is in memory at a time."""

    def __init__(self, tokenizer_ref: Any, block_len: int, out_uri: str, kind: str, where: str,
                 source: str | None = None, docs_per_encode: int = 1024) -> None:
        from transformers import AutoTokenizer

        from cbd_ray.storage import filesystem, materialize

        self.tok = AutoTokenizer.from_pretrained(str(materialize(tokenizer_ref)))
        self.tok.model_max_length = 1 << 62  # documents are cut into blocks here, not by the tokenizer
        eos = self.tok.eos_token_id
        if eos is None:
            raise CBDError("the tokenizer has no EOS token: documents could not be separated")
        self.eos, self.block_len, self.out_uri, self.kind, self.where = int(eos), block_len, out_uri, kind, where
        self.dtype = "uint16" if len(self.tok) <= 65535 else "uint32"
        self.fs_path = filesystem(source) if source else None
        self.docs_per_encode = docs_per_encode

    def _docs(self, batch: dict[str, Any]) -> list[str]:
        if "start" not in batch:
            return _documents(batch, self.kind, self.where)
        fs, path = self.fs_path
        lines = [ln for a, b in zip(batch["start"], batch["end"]) for ln in range_lines(fs, path, int(a), int(b))]
        return _documents({"text": lines}, self.kind, self.where)

    def _ids(self, docs: list[str]) -> Any:
        """All documents' tokens, each followed by EOS, as one int64 array."""
        import numpy as np

        parts = [np.zeros(0, dtype=np.int64)]
        for i in range(0, len(docs), self.docs_per_encode):
            ids = self.tok(docs[i:i + self.docs_per_encode], add_special_tokens=False)["input_ids"]
            parts.append(np.fromiter((t for doc in ids for t in (*doc, self.eos)), dtype=np.int64))
        return np.concatenate(parts)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from cbd_ray.storage import uri_join, write_bytes

        docs = self._docs(batch)
        flat = self._ids(docs)
        n = len(flat) // self.block_len
        name, digest = "", ""
        if n:
            data = flat[: n * self.block_len].astype(self.dtype).tobytes()
            digest = hashlib.sha256(data).hexdigest()
            name = f"blk-{digest[:24]}.bin"
            write_bytes(uri_join(self.out_uri, name), data)
        meta = {"name": name, "rows": n, "sha256": digest, "dtype": self.dtype, "tokens": int(len(flat)),
                "dropped": int(len(flat) - n * self.block_len), "docs": len(docs)}
        return {k: np.asarray([v]) for k, v in meta.items()}


def read_index(corpus_uri: str) -> dict[str, Any] | None:
    """The index of a finished corpus, or None when there is none (an unfinished build)."""
    from cbd_ray.storage import StorageError, filesystem, uri_exists, uri_join

    uri = uri_join(corpus_uri, INDEX)
    if not uri_exists(uri):
        return None
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except OSError as exc:
        raise StorageError(f"corpus index {corpus_uri} cannot be read: {exc}") from exc


def build_corpus(source: str, tokenizer_ref: Any, block_len: int, root: str, actors: int = 1,
                 docs_per_batch: int = 2048, say: Any = None, use_ray: bool = True) -> dict[str, Any]:
    """Tokenise ``source`` into ``<root>/<key>`` once (or reuse what is there) and return its
    reference ``{"uri": ..., "index": {...}}`` for :class:`TokenStream`. ``tokenizer_ref``: a
    model directory or storage reference (the actors fetch it into their node's cache).
    ``use_ray=False`` runs the same packing in this process, streaming the source (the loop
    run alone, and tests without Ray)."""
    import time

    from cbd_ray.storage import redact, uri_join, worker_ref, write_bytes

    say = say or (lambda m: log.info("%s", m))
    source = str(source)
    check_text_source(source)
    if block_len < 2:
        raise CBDError(f"block_len must be >= 2, got {block_len}")
    t0 = time.time()
    key = corpus_key(source_checksum(source), tokenizer_identity(tokenizer_ref), block_len)
    uri = uri_join(root, key)
    index = read_index(uri)
    if index is not None:
        say(f"[corpus] reusing {index['rows']} blocks of {block_len} tokens from {redact(uri)}")
        return {"uri": uri, "index": index}
    if use_ray:
        meta = _tokenize(source, worker_ref(tokenizer_ref), block_len, uri, actors, docs_per_batch)
    else:
        meta = _tokenize_here(source, tokenizer_ref, block_len, uri, docs_per_batch)
    files = sorted((m for m in meta if m["rows"]), key=lambda m: m["name"])
    index = {"format": FORMAT, "key": key, "block_len": block_len, "source": redact(source),
             "dtype": meta[0]["dtype"] if meta else "uint16",  # the shard writers' choice
             "files": [{"name": m["name"], "rows": m["rows"], "sha256": m["sha256"]} for m in files],
             "rows": sum(m["rows"] for m in files), "docs": sum(m["docs"] for m in meta),
             "tokens": sum(m["tokens"] for m in meta), "dropped_tokens": sum(m["dropped"] for m in meta)}
    if index["rows"] == 0:
        raise CBDError(f"text corpus {redact(source)!r} holds {index['tokens']} tokens: not one block of "
                       f"{block_len}")
    write_bytes(uri_join(uri, INDEX), json.dumps(index, indent=1).encode())
    say(f"[corpus] {index['docs']} documents -> {index['rows']} blocks of {block_len} tokens in "
        f"{len(files)} shard(s) at {redact(uri)} ({time.time() - t0:.1f}s)")
    return {"uri": uri, "index": index}


def _tokenize(source: str, tok_ref: Any, block_len: int, uri: str, actors: int,
              docs_per_batch: int) -> list[dict[str, Any]]:
    """Run the Ray Data pipeline; the shard metadata rows (small) come back to the driver."""
    import ray.data

    from cbd_ray.console import quiet_ray_data
    from cbd_ray.storage import filesystem, redact, split_uri

    quiet_ray_data()  # Ray Data's progress lines off a quiet console

    fs, path = filesystem(source)
    kind = Path(split_uri(source)[0]).suffix
    kwargs = {"tokenizer_ref": tok_ref, "block_len": block_len, "out_uri": uri, "kind": kind, "where": redact(source)}
    if kind == ".parquet":  # row groups stream; batches of documents
        ds = ray.data.read_parquet(path, filesystem=fs, columns=["text"])
        batch = docs_per_batch
    else:  # byte ranges of the file, each read by the actor that packs it (bounded memory)
        ds = ray.data.from_items(text_ranges(source))
        kwargs["source"], batch = source, 1
    # an actor's CPU share leaves room for the read tasks on a small node
    ds = ds.map_batches(PackShards, fn_constructor_kwargs=kwargs, batch_size=batch, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=max(1, actors)), num_cpus=0.5)
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in ds.iter_rows()]


def _source_batches(source: str, docs_per_batch: int) -> Iterator[dict[str, Any]]:
    """Batches ``{"text": [...]}`` of a source's lines (rows, for Parquet), streamed."""
    import io

    import pyarrow.parquet as pq

    from cbd_ray.storage import filesystem, split_uri

    fs, path = filesystem(source)
    if Path(split_uri(source)[0]).suffix == ".parquet":
        with fs.open_input_file(path) as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=docs_per_batch, columns=["text"]):
                yield {"text": rb.column(0).to_pylist()}
        return
    with fs.open_input_stream(path) as raw:
        lines: list[str] = []
        for line in io.TextIOWrapper(raw, encoding="utf-8"):
            if line.strip():
                lines.append(line.rstrip("\n"))
            if len(lines) == docs_per_batch:
                yield {"text": lines}
                lines = []
        if lines:
            yield {"text": lines}


def _tokenize_here(source: str, tok_ref: Any, block_len: int, uri: str, docs_per_batch: int) -> list[dict[str, Any]]:
    from cbd_ray.storage import redact, split_uri

    pack = PackShards(tok_ref, block_len, uri, Path(split_uri(source)[0]).suffix, redact(source))
    out = []
    for batch in _source_batches(source, docs_per_batch):
        m = pack(batch)
        out.append({k: v[0].item() if hasattr(v[0], "item") else v[0] for k, v in m.items()})
    return out


# ------------------------------------------------------------------------------ streaming


@dataclass
class _Chunk:
    start: int   # first global row
    rows: int


class TokenStream:
    """Worker ``rank`` of ``world``'s endless stream of blocks ``[block_len]`` from a corpus
    built by :func:`build_corpus`.

    Order: the corpus's rows are cut into chunks of ``chunk_rows`` consecutive rows. Epoch
    ``e`` permutes the chunks (seed, e); worker ``r`` takes the permuted chunks ``r, r+world,
    ...`` (the first ``world·⌊n_chunks/world⌋``) and reads each one's rows in a permuted order
    (seed, e, chunk). So within an epoch no block is drawn twice and workers never share one;
    only one chunk (``chunk_rows × block_len`` tokens) is in memory at a time, read with range
    reads from local disk or object storage. The position is a plain count of rows taken, so
    :meth:`seek` restores the exact sample after a restart."""

    def __init__(self, ref: dict[str, Any], rank: int = 0, world: int = 1, seed: int = 0,
                 chunk_rows: int = 256) -> None:
        import numpy as np

        from cbd_ray.storage import filesystem

        self.index, self.rank, self.world, self.seed = ref["index"], rank, world, seed
        self.block_len = int(self.index["block_len"])
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        n = int(self.index["rows"])
        if n < world:
            raise CBDError(f"the text corpus has {n} blocks of {self.block_len} tokens: fewer than the {world} workers")
        self.chunk = max(1, min(chunk_rows, n // world))
        self.n_rows, self.n_chunks = n, -(-n // self.chunk)
        self.fs, base = filesystem(ref["uri"])
        self.files = [(base.rstrip("/") + "/" + f["name"], int(f["rows"])) for f in self.index["files"]]
        self.starts = np.cumsum([0] + [r for _, r in self.files])
        self.position = 0
        self._buf: Any = None
        self._epoch_lens: list[int] = []
        self._order: Any = None

    # -- order
    def _chunks(self, epoch: int) -> list[_Chunk]:
        """This worker's chunks of ``epoch``, in reading order."""
        import numpy as np

        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)
        used = (self.n_chunks // self.world) * self.world
        mine = perm[:used][self.rank::self.world]
        return [_Chunk(int(c) * self.chunk, min(self.chunk, self.n_rows - int(c) * self.chunk)) for c in mine]

    def _epoch_len(self, epoch: int) -> int:
        while len(self._epoch_lens) <= epoch:
            self._epoch_lens.append(sum(c.rows for c in self._chunks(len(self._epoch_lens))))
        return self._epoch_lens[epoch]

    def _locate(self, position: int) -> tuple[int, int]:
        """(epoch, row offset within this worker's epoch) of a stream position."""
        epoch = 0
        while position >= self._epoch_len(epoch):
            position -= self._epoch_len(epoch)
            epoch += 1
        return epoch, position

    # -- reading
    def _read_rows(self, start: int, count: int) -> Any:
        """Rows ``[start, start+count)`` of the corpus as ``[count, block_len]`` (range reads)."""
        import numpy as np

        out, row, width = [], start, self.block_len * self.dtype.itemsize
        while row < start + count:
            f = int(np.searchsorted(self.starts, row, side="right")) - 1
            path, rows = self.files[f]
            lo = row - int(self.starts[f])
            take = min(rows - lo, start + count - row)
            with self.fs.open_input_file(path) as fh:
                data = fh.read_at(take * width, lo * width)
            out.append(np.frombuffer(data, dtype=self.dtype).reshape(take, self.block_len))
            row += take
        return np.concatenate(out)

    def _chunk_rows(self, epoch: int, i: int) -> Any:
        """This worker's ``i``-th chunk of ``epoch``, rows permuted; one chunk is cached."""
        import numpy as np

        if self._buf is not None and self._buf[0] == (epoch, i):
            return self._buf[1]
        self._row_at(epoch, 0)  # the epoch's order is cached
        c = self._order[1][i]
        rows = self._read_rows(c.start, c.rows)
        rows = rows[np.random.default_rng([self.seed, epoch, c.start]).permutation(c.rows)]
        self._buf = ((epoch, i), rows)
        return rows

    def _row_at(self, epoch: int, offset: int) -> tuple[int, int, int]:
        """(chunk number, row in chunk, rows left in chunk) of an offset within an epoch."""
        import numpy as np

        if self._order is None or self._order[0] != epoch:
            chunks = self._chunks(epoch)
            self._order = (epoch, chunks, np.cumsum([0] + [c.rows for c in chunks]))
        _, chunks, starts = self._order
        i = int(np.searchsorted(starts, offset, side="right")) - 1
        r = offset - int(starts[i])
        return i, r, chunks[i].rows - r

    def seek(self, position: int) -> None:
        """Continue from ``position`` rows into this worker's stream (resume)."""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        self.position = position

    def take(self, n: int) -> Any:
        """The next ``n`` blocks: int64 ``[n, block_len]`` (numpy)."""
        import numpy as np

        parts = []
        while n > 0:
            epoch, offset = self._locate(self.position)
            i, r, left = self._row_at(epoch, offset)
            k = min(n, left)
            parts.append(self._chunk_rows(epoch, i)[r:r + k])
            self.position += k
            n -= k
        return np.concatenate(parts).astype(np.int64)

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield self.take(1)[0]
