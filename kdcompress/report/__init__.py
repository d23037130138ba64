"""Reporting: evaluation metrics, figures, the leaderboard over all student runs and the one model
card."""
