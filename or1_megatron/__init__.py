"""or1-megatron: the Skywork-OR1 (MAGIC) RL recipe on a Megatron-core policy with SGLang rollouts."""

__version__ = "0.1.0"
