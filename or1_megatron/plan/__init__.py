"""Capacity planning: per-GPU memory of a layout (and, with the planner tool, step time)."""
