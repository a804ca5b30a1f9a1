"""Trainers (one flat loop per model family)."""
