"""One MiniLLM chain step with a pretraining corpus of growing size: memory stays flat.

For each size (default 10 MB, 100 MB, 1 GB) a corpus is generated under the temp dir from
../shared/data text (WikiText-2 paragraphs and TinyShakespeare lines, shuffled and
repeated; one document per line, LMOps' ``<@x(x!>`` newline marker inside), then:

1. tokenisation throughput: the GPT-2 tokenizer's own batch encoding over the first 8 MB in
   this process, against cbd's Ray Data build (an actor pool of ``--actors`` on the same
   cores, writing token shards) over the whole corpus;
2. ``run_distill`` with objective ``minillm`` (tiny GPT-2 teacher and student on the GPT-2
   tokenizer, 2 Ray Train workers, 2 steps) reading the corpus: peak RSS of the driver and of
   every Ray worker process (psutil over the process tree, sampled every 0.2 s), and the
   time from the start of the run to the end of the first optimiser step.

The corpus is built once per size; the run's storage is fresh each time, so the build is in
the measured run. Prints one JSON line per size and writes them all to ``--out``.

    python bench/data_scale.py --sizes 10,100,1000 --out docs/bench_data_scale_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def make_corpus(path: Path, mb: int, seed: int = 0) -> Path:
    """``mb`` MB of documents, one per line, from WikiText-2 paragraphs and Shakespeare."""
    rng = random.Random(seed)
    paras = [p.strip() for f in ("wiki.valid.raw", "wiki.test.raw")
             for p in (DATA / "wikitext2" / f).read_text(encoding="utf-8").split("\n") if len(p.strip()) > 80]
    shakes = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").split("\n\n")
    docs = paras + ["<@x(x!>".join(s.strip().splitlines()) for s in shakes if s.strip()]
    target, written = mb * 1_000_000, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            rng.shuffle(docs)
            for d in docs:
                line = d + "\n"
                f.write(line)
                written += len(line.encode())
                if written >= target:
                    break
    return path


class PeakRSS:
    """Peak RSS per process of this process's tree and of Ray's worker processes."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peaks, self.names = interval, {}, {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            procs = [me, *me.children(recursive=True)]
            procs += [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and
                      p.info["cmdline"][0].startswith("ray::") and p not in procs]
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    if rss > self.peaks.get(p.pid, 0):
                        self.peaks[p.pid] = rss
                        self.names[p.pid] = "driver" if p.pid == me.pid else " ".join(p.cmdline()[:1])[:40]
                except Exception:  # noqa: BLE001 - a process may end between listing and reading
                    pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def summary(self) -> dict:
        mb = {pid: v / 2**20 for pid, v in self.peaks.items()}
        workers = {self.names[p]: 0.0 for p in mb}
        for p, v in mb.items():
            workers[self.names[p]] = max(workers[self.names[p]], v)
        driver = max((v for p, v in mb.items() if self.names[p] == "driver"), default=0.0)
        ray_workers = sorted(((self.names[p], round(v, 1)) for p, v in mb.items() if self.names[p].startswith("ray::")),
                             key=lambda x: -x[1])
        return {"driver_mb": round(driver, 1), "max_ray_worker_mb": ray_workers[0][1] if ray_workers else 0.0,
                "ray_workers_top": ray_workers[:6]}


def tokenizer_baseline(corpus: Path, tok, mb: int = 8) -> float:
    """Tokens/s of the tokenizer's own batch encoding over the first ``mb`` MB."""
    lines, size = [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            lines.append(line.rstrip("\n").replace("<@x(x!>", "\n"))
            size += len(line)
            if size > mb * 1_000_000:
                break
    t0, n = time.perf_counter(), 0
    for i in range(0, len(lines), 2048):
        n += sum(len(x) + 1 for x in tok(lines[i:i + 2048], add_special_tokens=False)["input_ids"])
    return n / (time.perf_counter() - t0)


def models(root: Path, tok) -> tuple[Path, Path]:
    from cbd_ray.tiny import save_tiny_model

    t = save_tiny_model(root / "teacher", "gpt2", tok, seed=1, layers=2, hidden=64, heads=4, max_positions=256)
    s = save_tiny_model(root / "student", "gpt2", tok, seed=2, layers=2, hidden=32, heads=2, max_positions=256)
    return t, s


def one_size(mb: int, work: Path, tok, pair, actors: int) -> dict:
    from cbd_ray.corpus import build_corpus
    from cbd_ray.train import DistillConfig, run_distill

    corpus = make_corpus(work / f"corpus_{mb}mb.txt", mb)
    base = tokenizer_baseline(corpus, tok)
    cfg = DistillConfig(objective="minillm", steps=2, batch_size=4, micro_batch=2, max_len=128, lr=1e-4,
                        checkpoint_every=2, data_limit=64, device="cpu", workers=2, max_new_tokens=16,
                        ppo_epochs=2, lm_data=str(corpus), data_actors=actors, log_every=1)
    dolly = DATA / "dolly" / "dolly_train_1k.jsonl"
    with PeakRSS() as build_peaks:  # the run's own corpus folder: run_distill then reuses it
        t0 = time.time()
        ref = build_corpus(str(corpus), pair[1], cfg.max_len, str(work / f"run_{mb}" / "corpora"), actors=actors)
        build_s = time.time() - t0
    with PeakRSS() as peaks:
        t0 = time.time()
        m = run_distill(pair[0], pair[1], dolly, work / f"out_{mb}", cfg, storage_path=work / f"run_{mb}")
    return {"corpus_mb": mb, "tokens": ref["index"]["tokens"], "blocks": ref["index"]["rows"],
            "tokenizer_tokens_per_s": round(base), "cbd_build_tokens_per_s": round(ref["index"]["tokens"] / build_s),
            "cbd_build_s": round(build_s, 1), "build_driver_mb": build_peaks.summary()["driver_mb"],
            "build_max_ray_worker_mb": build_peaks.summary()["max_ray_worker_mb"],
            "run_s": round(time.time() - t0, 1), "first_step_s": round(m["first_step_unix"] - t0, 1),
            **peaks.summary()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,100,1000", help="corpus sizes in MB, comma-separated")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    for k, v in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                 "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)
    import ray

    from cbd_ray.tiny import gpt2_tokenizer

    tok = gpt2_tokenizer(DATA / "gpt2_tokenizer")
    rows = []
    with tempfile.TemporaryDirectory(prefix="cbd_data_scale_") as d:
        work = Path(d)
        pair = models(work, tok)
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=1 << 30)
        for mb in (int(x) for x in args.sizes.split(",")):
            row = one_size(mb, work, tok, pair, args.actors)
            print(json.dumps(row), flush=True)
            rows.append(row)
            for f in work.glob(f"corpus_{mb}mb.txt"):
                f.unlink()
        ray.shutdown()
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": "2-core CPU, 24 GiB, no GPU", "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
