"""The `or1` console script: one entry point whose subcommands live in their own modules.

Each subcommand is a `main(argv: list[str]) -> int` function imported only when it is run, so
`or1 --help` stays fast and a subcommand's heavy imports (megatron, ray) cost nothing elsewhere.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module path, one-line help). A new subcommand is one line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("or1_megatron.config.command", "load, validate and print a resolved config"),
    "check": ("or1_megatron.policy.smoke", "build the policy at a TP/PP layout and check it on CPU"),
    "convert": ("or1_megatron.convert.checkpoint_tool", "convert checkpoints between Hugging Face and Megatron"),
    "serve": ("or1_megatron.rollout.server", "serve a model with SGLang's HTTP API (the torch rollout engine; CPU or --device cuda)"),
    "train": ("or1_megatron.controller.command", "run OR1 training (Ray, Megatron policy, rollout engines)"),
    "plan": ("or1_megatron.plan.command", "memory per GPU and step time of a config on N nodes"),
    "data": ("or1_megatron.data.check_command", "check data files: malformed rows, sources, difficulty, prompt lengths, filters"),
    "eval": ("or1_megatron.eval.command", "avg@k / pass@k of a model on evaluation data, per data source"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: or1 <command> [args...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "Run `or1 <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"or1: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
