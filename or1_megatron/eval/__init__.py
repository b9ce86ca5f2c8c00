"""Evaluation and difficulty estimation: sample responses through rollout engines and score them.

sampling.py    the one sampling + scoring path (engines, router, prompts, reward pool) and the
               command-line options shared by the commands below
metrics.py     avg@k, unbiased pass@k, the paper's k per data source, the printed table
command.py     `or1 eval`: per-source avg@k / pass@k, printed and saved as JSON
difficulty.py  tools/estimate_difficulty.py: pass rates for the offline filter (data/filters.py)
"""
