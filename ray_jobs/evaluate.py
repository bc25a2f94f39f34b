"""Distributed evaluation with Ray Data: RISMetrics over every expression of shard splits, merged
across workers; per-split JSON plus report.json / report.md.

    python ray_jobs/evaluate.py --checkpoint demo_out/checkpoint --shards demo_out/shards \
        --dataset synthref --splits val testA testB --out eval_out [--oracle-box] \
        [--predictions eval_out/predictions.jsonl] [--protocol glamm --protocol-seed 0]

Same as `ppcr evaluate --ray`; the pipeline is `ppcr.batch.evaluate_shards`, whose numbers
equal the single-process `ppcr.evaluate.evaluate_split` (`ppcr evaluate` without --ray).
"""

import sys

from ppcr.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", "--ray", *sys.argv[1:]]))
