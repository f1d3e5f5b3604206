"""`tsssm data fetch skab|ett [--to DIR] [--mirror URL]` and `tsssm data list`: the benchmark
datasets, downloaded from their pinned upstream commits and checked (see tsssm.data.fetch)."""

from __future__ import annotations

import argparse
import sys

from tsssm.data.fetch import SOURCES, data_home, default_root, fetch, missing_files
from tsssm.errors import TsssmError

USAGE = """examples:
  tsssm data fetch skab                 # into the cache folder that data=skab reads by default
  tsssm data fetch ett --to ~/data/ett  # elsewhere: then train with data.root=~/data/ett
  tsssm data list                       # what is in the cache"""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tsssm data", epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"The benchmark datasets ({', '.join(SOURCES)}), fetched from their "
                    f"upstream repositories at pinned commits and checked by SHA-256. The "
                    f"cache folder is {data_home()} ($TSSSM_DATA overrides it).")
    sub = ap.add_subparsers(dest="action", required=True)
    f = sub.add_parser("fetch", help="download a dataset and verify it")
    f.add_argument("name", choices=sorted(SOURCES))
    f.add_argument("--to", help="folder to put it in (default: its folder in the cache)")
    f.add_argument("--mirror", help="base URL to fetch from instead of upstream "
                                    "(e.g. file:///srv/mirror/skab/)")
    sub.add_parser("list", help="the datasets, their source and whether they are in the cache")
    return ap


def main(argv: list[str]) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exit_:  # argparse printed its message
        return int(exit_.code or 0)
    try:
        if args.action == "list":
            for name, src in SOURCES.items():
                missing = missing_files(name)
                state = ("complete" if not missing else
                         f"{len(src.files) - len(missing)} of {len(src.files)} files")
                print(f"{name:<5} {state:<16} {default_root(name)}\n      from {src.base_url}"
                      f"\n      license {src.license}; cite {src.cite}")
            return 0
        src = SOURCES[args.name]
        folder = fetch(args.name, args.to, mirror=args.mirror,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(f"{args.name}: {len(src.files)} files verified in {folder}")
        print(f"  license {src.license}; cite {src.cite}")
        if args.to:
            print(f"  train on it with data.root={folder}")
        return 0
    except TsssmError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
