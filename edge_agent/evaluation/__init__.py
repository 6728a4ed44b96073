"""Offline evaluation on DCASE-layout data: the layout, the official metrics, reports, synthetic data."""
