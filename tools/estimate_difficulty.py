"""Pass rates of a model on training prompts, for the offline filter: see `--help`.

    python tools/estimate_difficulty.py --model-path DIR --data FILE... [--n N] --out FILE [--resume]

Writes JSON lines {"uid", "solved", "samples"} (data.filters.load_pass_rates reads them).
"""
import sys

from or1_megatron.eval.difficulty import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
