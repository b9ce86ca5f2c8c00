"""The OR1 (MAGIC) algorithm pieces that are not the loss kernel: group advantages, rejection
sampling of uniform groups, and the adaptive entropy controller."""
from or1_megatron.algo.entropy_control import AdaptiveEntropyController
from or1_megatron.algo.grpo import GroupFilter, filter_uniform_groups, group_advantages

__all__ = ["AdaptiveEntropyController", "GroupFilter", "filter_uniform_groups", "group_advantages"]
