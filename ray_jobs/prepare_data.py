"""REFER, a JSONL manifest or COCO + expressions -> Parquet shards as a Ray Data job (`ppcr prepare
--ray`): parallel, deterministic, resumable, bad records reported to <out>/<dataset>_<split_by>/errors.jsonl.

    python ray_jobs/prepare_data.py --refer-root /data/refer --images /data/coco/train2014 \\
        --dataset refcoco --split-by unc --out /data/shards
    python ray_jobs/prepare_data.py --format jsonl --manifest /data/mine/refs.jsonl \\
        --dataset mine --out /data/shards                      (docs/custom_data.md)

Takes the arguments of `ppcr prepare`; the logic lives in ppcr/data/distributed_prepare.py.
"""

import sys

from ppcr.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", "--ray", *sys.argv[1:]]))
