"""Capacity planning: per-GPU memory and step time of a layout, and whether it fits.

memory.py         the Megatron policy's bytes per GPU (weights, grads, optimizer, activations)
engine_memory.py  one SGLang engine's weights and KV cache at rollout.mem_fraction
hardware.py       GPU peaks and the efficiency factors estimates use
layout.py         the knobs a plan varies, read from a config and written back as overrides
step_time.py      rollout / logprob / train / sync time from FLOPs and bandwidths
fit.py            per-stage verdict and the least-changed layout that fits
report.py         the printed report; command.py the tools/plan.py command line
"""
