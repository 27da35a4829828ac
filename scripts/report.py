"""Draw ``report.html`` for a run: ``python scripts/report.py RUN_DIR [--out PATH]``.

Any run directory works, finished or not, killed or resumed: the report reads its
``metrics.jsonl``, ``summary.json`` and ``config.yaml`` (see ``ssl_toolkit.html_report``).
``--out`` writes the report elsewhere (a run directory that is read-only). Exit 2, with one
line, for a folder that is not a run directory or a report that cannot be written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssl_toolkit.html_report import REPORT_FILE, ReportNotWritable, write_report
from ssl_toolkit.metrics_file import METRICS_FILE


def main(argv: list[str] | None = None) -> int:
    """Write the report; 0 on success, 2 for a folder without a run's metrics, a file that
    cannot be read, or a report that cannot be written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (trainer.output_dir)")
    parser.add_argument(
        "--out", type=Path, help=f"the report's path; default: RUN_DIR/{REPORT_FILE}"
    )
    args = parser.parse_args(argv)
    if not (args.run_dir / METRICS_FILE).is_file():
        print(f"report: {args.run_dir} has no {METRICS_FILE}: not a run directory", file=sys.stderr)
        return 2
    try:
        print(write_report(args.run_dir, args.out))
    except ReportNotWritable as error:
        reason = error.strerror or error.__cause__
        if args.out is None:
            print(
                f"report: {args.run_dir} is not writable ({reason}); "
                "write the report elsewhere with --out PATH",
                file=sys.stderr,
            )
        else:
            print(f"report: cannot write {args.out} ({reason})", file=sys.stderr)
        return 2
    except OSError as error:
        where = error.filename or args.run_dir
        print(f"report: cannot read {where} ({error.strerror or error})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
