"""Running on clusters: Slurm jobs that form a Ray cluster and run `or1 train` on it.

slurm_script.py  the sbatch script (Ray head/workers, bounded joins, failure and requeue handling)
ray_node.py      what each node's srun step runs: one Ray node's life, and the bounded waits
submit.py        the tools/submit_slurm.py command line: validate, write, sbatch
"""
