"""`cellstream demo data`: write the demo's CSV (weekly CO2 at Mauna Loa) where replay can read it.

The CSV travels beside the demo model in the bundled model repository (models/demo/), so the
demo works offline and from an installed wheel, without the package it was taken from.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

DEMO_MODEL = "demo"
DEMO_CSV = "co2_weekly.csv"


def demo_csv() -> Path:
    """The shipped CSV: columns `date` (ISO week end) and `co2` (ppm), 2284 weekly rows, 1958-2001."""
    from cellstream.config import bundled_models_dir  # noqa: PLC0415

    return bundled_models_dir() / DEMO_MODEL / DEMO_CSV


def register(commands: Any) -> None:
    """Add `demo` (with `demo data`) to the top-level sub-commands."""
    demo = commands.add_parser("demo", help="the bundled demo: real CO2 readings and a GRU forecaster")
    demo_commands = demo.add_subparsers(dest="demo_command", required=True)
    data = demo_commands.add_parser(
        "data",
        help="write the demo's CSV (weekly CO2 at Mauna Loa, 1958-2001, public domain)",
        description="Write the demo's readings: weekly CO2 (ppm) at Mauna Loa, March 1958 - December "
        "2001 (Keeling & Whorf, Scripps / CDIAC; public domain). Then: cellstream replay FILE --model demo",
    )
    data.add_argument("--out", default=DEMO_CSV, help=f"where to write it ('-' = stdout; default {DEMO_CSV})")
    data.set_defaults(func=_data)


def _data(args: argparse.Namespace) -> int:
    source = demo_csv()
    if not source.is_file():
        print(f"cellstream demo data: {source} is missing from this installation", file=sys.stderr)
        return 2
    if args.out == "-":
        sys.stdout.write(source.read_text())
        return 0
    shutil.copyfile(source, args.out)
    rows = source.read_text().count("\n") - 1
    print(f"wrote {args.out}: {rows} weekly CO2 readings; next: cellstream replay {args.out} --model demo")
    return 0
