"""Where a distillation stage's training records are tokenised: a Ray Data actor pool
(``tokenize_dataset``, what ``data_actors: 1`` does) against the driver
(``tokenize_in_process``, what ``data_actors: auto`` does up to
``cbd_ray.train.DRIVER_TOKENISE_RECORDS`` records), side by side in one run on one local Ray,
on Dolly records (the 1,000 of ../shared/data, cycled) with its GPT-2 tokenizer. Each path is timed from the
records in the driver's memory to the Arrow table the shards are cut from; both tables are
checked equal.

    python bench/tokenise_paths.py [--sizes 44 1000 4096 15011] [--repeat 3] [--out bench/out/tokenise_paths.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _records(n: int) -> list[dict]:
    from cbd_ray.data import read_instructions

    pool = read_instructions(SHARED / "dolly" / "dolly_train_1k.jsonl")  # cycled past its 1,000 records
    return [{**pool[i % len(pool)], "idx": i} for i in range(n)]


def _time(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[44, 1000, 4096, 15011])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "tokenise_paths.json"))
    args = ap.parse_args(argv)
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    import ray

    from cbd_ray.data import tokenize_dataset, tokenize_in_process
    from cbd_ray.train import records_table

    from cbd_ray.tiny import gpt2_tokenizer

    tok = str(Path(args.out).parent / "gpt2_tokenizer")  # saved once in transformers' own format
    gpt2_tokenizer(SHARED / "gpt2_tokenizer").save_pretrained(tok)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for n in args.sizes:
            items = _records(n)
            pool, driver = [], []
            for _ in range(args.repeat):
                t, a = _time(lambda: records_table(tokenize_dataset(ray.data.from_items(items), tok, args.max_len,
                                                                    actors=1).materialize()))
                pool.append(t)
                t, d = _time(lambda: tokenize_in_process(items, tok, args.max_len))
                driver.append(t)
                assert d.equals(a), f"{n} records: the two tables differ"
            row = {"records": n, "actor_pool_s": pool, "driver_s": driver,
                   "actor_pool_median_s": statistics.median(pool), "driver_median_s": statistics.median(driver),
                   "pool_over_driver": statistics.median(pool) / statistics.median(driver)}
            rows.append(row)
            print(f"{n:>7,} records: actor pool {row['actor_pool_median_s']:6.2f} s, driver "
                  f"{row['driver_median_s']:6.2f} s  (pool/driver {row['pool_over_driver']:.1f}x)", flush=True)
    finally:
        ray.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": f"{os.cpu_count()} CPUs", "load_avg": os.getloadavg(),
                               "max_len": args.max_len, "rows": rows}, indent=2))
    print(json.dumps({"bench": "tokenise_paths", "out": str(out),
                      **{f"pool_over_driver_{r['records']}": round(r["pool_over_driver"], 2) for r in rows}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
