import sys

from pcl_hpc.cli import main

sys.exit(main())
