"""Submit `or1 train` as a multi-node Slurm job on a Ray cluster: see `--help`.

    python tools/submit_slurm.py --config configs/or1_32b.yaml --nodes 8 --gpus-per-node 8 \
        --partition gpu --time 2-00:00:00 [--dry-run] [--run-dir DIR] [--max-steps N] [key=value ...]
"""
import sys

from or1_megatron.cluster.submit import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
