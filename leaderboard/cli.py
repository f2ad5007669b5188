"""`python -m leaderboard build|export`: the leaderboard, or the records as one table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leaderboard.build import LeaderboardError, atomic_write, build, replace_summary, summary, write
from leaderboard.frame import FORMATS, export, load_results, skipped_files

EXPORT_EXAMPLES = """examples:
  python -m leaderboard export --results-dir results --format csv --output results.csv
  python -m leaderboard export --results-dir leaderboard/reference/results --format parquet --output ref.parquet
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m leaderboard", description="Build LEADERBOARD.md from result records."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="validate every record under the results folder and write the leaderboard")
    b.add_argument("--results-dir", type=Path, default=Path("results"), help="folder of records (default: results)")
    b.add_argument(
        "--output", type=Path, default=None, help="output markdown (default: LEADERBOARD.md beside the results folder)"
    )
    b.add_argument("--no-plots", action="store_true", help="write the markdown only")
    b.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="also rewrite the compact summary between the leaderboard markers in this file (e.g. README.md)",
    )
    e = sub.add_parser(
        "export",
        help="write every valid record as one row of a CSV, parquet or JSON-lines table",
        epilog=EXPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("--results-dir", type=Path, default=Path("results"), help="folder of records (default: results)")
    # Checked by `export`, not by argparse, so a wrong format is a one-line error like any other.
    e.add_argument("--format", dest="fmt", default="csv", help=f"{' | '.join(FORMATS)} (default: csv)")
    e.add_argument("--output", type=Path, required=True, help="file to write")
    return parser


def _export(args: argparse.Namespace) -> int:
    if args.fmt not in FORMATS:  # before reading any record
        raise LeaderboardError(f"unknown export format {args.fmt!r}; choose one of {', '.join(FORMATS)}")
    frame = load_results(args.results_dir)
    for s in skipped_files(frame):
        print(f"skipped {s.reason}", file=sys.stderr)
    export(frame, args.output, args.fmt)
    skipped = len(skipped_files(frame))
    print(f"wrote {args.output}: {len(frame)} record(s), {len(frame.columns)} column(s); skipped {skipped} file(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "export":
        try:
            return _export(args)
        except LeaderboardError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    results_dir: Path = args.results_dir
    output: Path = args.output or results_dir.absolute().parent / "LEADERBOARD.md"
    try:
        board = build(results_dir, plots=not args.no_plots)
        for s in board.skipped:
            print(f"skipped {s.reason}", file=sys.stderr)
        write(board, output)
        if args.readme is not None:
            try:
                text = args.readme.read_text()
            except OSError as exc:
                raise LeaderboardError(f"cannot read --readme {args.readme}: {exc}") from None
            atomic_write(args.readme, replace_summary(text, summary(board.headlines)).encode())
    except LeaderboardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {output} from {len(board.entries)} record(s) in {len(board.tables)} table(s)"
        f"{f', {len(board.plots)} plot(s)' if board.plots else ''}; skipped {len(board.skipped)} file(s)"
    )
    return 0
