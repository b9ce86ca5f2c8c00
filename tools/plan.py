"""Memory per GPU and step time of a run config on N nodes: see `--help`.

    python tools/plan.py --config configs/or1_32b.yaml --nodes 8 --gpu h100-80gb \
        model.hf_path=configs/models/deepseek-r1-distill-qwen-32b.json
"""
import sys

from or1_megatron.plan.command import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
