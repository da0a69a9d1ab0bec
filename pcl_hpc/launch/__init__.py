"""Running pcl-hpc on SLURM through submitit (the only package that imports submitit), in layers:

``cluster`` (what scontrol / sacct / sinfo say, the settings checks) <- ``jobs`` (the checkpointable
jobs) <- ``executors`` (submitit executors, waiting for jobs) <- ``chain`` (a plan's steps as chained
jobs and arrays, the ledger) <- ``status`` (the ledger's table, resubmission) <- ``cli`` (the
``launchers/slurm.py`` command). Each imports only the ones before it.
"""

import os

# The job's preemption signal, set before submitit is imported (it reads it then, also inside the
# job): the one SLURM is asked for before the time limit and the one the StepGuard takes.
PREEMPT_SIGNAL = "USR1"
os.environ["SUBMITIT_PREEMPT_SIGNAL"] = PREEMPT_SIGNAL
