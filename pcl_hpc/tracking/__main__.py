"""``python -m pcl_hpc.tracking replay <fallback file> [--uri URI] | promote NAME SOURCE [--alias A] [--uri URI]``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from pcl_hpc.errors import UserError
from pcl_hpc.tracking._common import FALLBACK_FILE
from pcl_hpc.tracking.fallback import replay_fallback
from pcl_hpc.tracking.registry import promote_alias


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pcl_hpc.tracking", description="pcl-hpc MLflow tools")
    sub = parser.add_subparsers(dest="command", required=True)
    replay = sub.add_parser("replay", help="send a metrics_fallback.jsonl to the tracking server")
    replay.add_argument("fallback", help="path to metrics_fallback.jsonl")
    replay.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI)")
    replay.add_argument("--experiment", default=None, help="experiment for runs that were never created")
    promote = sub.add_parser("promote", help="move an alias (default champion) to a version")
    promote.add_argument("name")
    promote.add_argument("source", help="version number, alias, or models:/ URI")
    promote.add_argument("--alias", default="champion")
    promote.add_argument("--uri", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "replay":
            if not Path(args.fallback).is_file():
                raise UserError(f"{args.fallback}: no such fallback file (it is <output_dir>/{FALLBACK_FILE})")
            print(json.dumps(replay_fallback(args.fallback, args.uri, args.experiment), indent=2))
        else:
            print(promote_alias(args.name, args.source, args.alias, tracking_uri=args.uri))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
