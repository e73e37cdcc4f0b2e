"""Write models/demo/co2_weekly.csv from the Mauna Loa CO2 series that statsmodels ships.

The CSV is checked in (beside the demo model, so it travels in the wheel): neither the server
nor the replay needs statsmodels. This script only documents, and can redo, where it came from.

Source: Keeling, C.D. and T.P. Whorf (2004), atmospheric CO2 from continuous air samples at
Mauna Loa Observatory, Hawaii (Scripps Institution of Oceanography / CDIAC); weekly averages,
March 1958 - December 2001; public domain (statsmodels.datasets.co2).

    python demo/make_data.py [OUT.csv]      # needs: pip install statsmodels
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "models" / "demo" / "co2_weekly.csv"


def main(out: Path = DEFAULT_OUT) -> None:
    from statsmodels.datasets import co2  # type: ignore[import-untyped]  # noqa: PLC0415 - only here

    series = co2.load_pandas().data["co2"]
    missing = int(series.isna().sum())
    # A stream reading must be finite; the 59 weeks with no valid measurement are filled by
    # linear interpolation between their neighbours (and said so in docs/demo.md).
    filled = series.interpolate(method="linear")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["date", "co2"])
        for day, value in filled.items():
            writer.writerow([day.date().isoformat(), f"{value:.2f}"])
    print(f"wrote {out}: {len(filled)} weeks, {missing} filled by interpolation")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
