"""The command users type on a cluster: `python launchers/slurm.py <command> ...` (see pcl_hpc/launch/cli.py).

pretrain | finetune | sweep | pipeline | predict | status. The same command is `python -m pcl_hpc.launch`.
"""

import sys

from pcl_hpc.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
