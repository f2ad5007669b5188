"""The leaderboard: result records in, tables, plots and a DataFrame out."""

from leaderboard.frame import load_headline, load_results

__all__ = ["load_headline", "load_results"]
