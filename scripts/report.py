"""Draw ``report.html`` for a run: ``python scripts/report.py RUN_DIR``.

Any run directory works, finished or not, killed or resumed: the report reads its
``metrics.jsonl``, ``summary.json`` and ``config.yaml`` (see ``ssl_toolkit.html_report``).
Exit 2, with one line, for a folder that is not a run directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssl_toolkit.html_report import write_report
from ssl_toolkit.metrics_file import METRICS_FILE


def main(argv: list[str] | None = None) -> int:
    """Write the report; 0 on success, 2 for a folder without a run's metrics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (trainer.output_dir)")
    args = parser.parse_args(argv)
    if not (args.run_dir / METRICS_FILE).is_file():
        print(f"report: {args.run_dir} has no {METRICS_FILE}: not a run directory", file=sys.stderr)
        return 2
    print(write_report(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
