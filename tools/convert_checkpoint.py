"""Convert checkpoints between Hugging Face and Megatron: see `or1 convert --help`.

    python tools/convert_checkpoint.py hf-to-mcore --hf-dir DIR --out DIR --tp N --pp M [--dtype bf16|fp32]
    python tools/convert_checkpoint.py mcore-to-hf --mcore-dir DIR --out DIR
"""
import sys

from or1_megatron.convert.checkpoint_tool import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
