"""Anomaly scores from memory banks: kNN search, domain normalizers, banks on disk, enrollment, thresholds."""
