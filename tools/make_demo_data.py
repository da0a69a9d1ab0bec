"""Write the offline demo dataset (see pcl_hpc/data/demo_data.py for what it contains).

    python tools/make_demo_data.py --out data/demo_raw --spacing 3.0 --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pcl_hpc.data.demo_data import make_demo_data  # noqa: E402
from pcl_hpc.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (imagesTr/, labelsTr/, imagesTs/ are created in it)")
    parser.add_argument("--spacing", type=float, default=3.0, help="isotropic voxel size in mm (default 3.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic intensities (default 0)")
    args = parser.parse_args(argv)
    try:
        info = make_demo_data(args.out, spacing=args.spacing, seed=args.seed)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {len(info['cases'])} labeled cases ({', '.join(info['cases'])}) and "
        f"{len(info['unlabeled'])} unlabeled ({', '.join(info['unlabeled'])}) to {info['out_dir']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
