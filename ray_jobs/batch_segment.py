"""Offline batch segmentation with Ray Data: manifest or shards in, Parquet masks out.

    python ray_jobs/batch_segment.py --input manifest.jsonl --out out/ --checkpoint demo_out/checkpoint
    RAY_ADDRESS=auto python ray_jobs/batch_segment.py ... --config batch.yaml --set mllm.concurrency=4

Same as `ppcr batch`; the pipeline is `ppcr.batch.run_batch`. Re-run with the same
--out to finish an interrupted job.
"""

import sys

from ppcr.cli import main

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))
