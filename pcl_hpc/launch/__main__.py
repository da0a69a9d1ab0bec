"""`python -m pcl_hpc.launch ...`: the same command as `python launchers/slurm.py ...`."""

import sys

from pcl_hpc.launch.cli import main

sys.exit(main())
