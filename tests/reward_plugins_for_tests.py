"""Reward plug-ins that misbehave on purpose, imported by the reward pool's workers in tests."""
import os
import time

from or1_megatron.rewards import register_reward


@register_reward("crash")
def crash(data_source, solution_str, ground_truth, extra_info=None):
    os._exit(3)  # kills the worker process outright


@register_reward("hang")
def hang(data_source, solution_str, ground_truth, extra_info=None):
    time.sleep(3600)
    return 1.0


@register_reward("echo")
def echo(data_source, solution_str, ground_truth, extra_info=None):
    return float(ground_truth)
