"""`or1 config --config FILE [key=value ...]`: print the resolved, validated config."""
from __future__ import annotations

import argparse
import sys

from or1_megatron.config.loader import load_config, to_yaml
from or1_megatron.errors import OR1Error


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="or1 config", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-6")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except OR1Error as exc:
        print(f"or1 config: error: {exc}", file=sys.stderr)
        return 2
    print(to_yaml(config), end="")
    return 0
