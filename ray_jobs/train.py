"""Cluster training job: Ray Data -> Ray Train TorchTrainer -> DeepSpeed ZeRO-2 (`ppcr train`).

    python ray_jobs/train.py --config configs/train/tiny_cpu.yaml          # local Ray cluster
    ray job submit --address http://<head>:8265 --working-dir . -- \\
        python ray_jobs/train.py --config configs/train/ppcr_llava7b.yaml  # the cluster of cluster.yaml

Takes the arguments of `ppcr train` (see --help); the logic lives in ppcr/distributed_train.py.
"""

import sys

from ppcr.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
