"""`python -m leaderboard build [--results-dir DIR] [--output FILE]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leaderboard.build import LeaderboardError, atomic_write, build, replace_summary, summary, write


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
            atomic_write(args.readme, replace_summary(text, summary(board.tables)).encode())
    except LeaderboardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {output} from {len(board.entries)} record(s) in {len(board.tables)} table(s)"
        f"{f', {len(board.plots)} plot(s)' if board.plots else ''}; skipped {len(board.skipped)} file(s)"
    )
    return 0
