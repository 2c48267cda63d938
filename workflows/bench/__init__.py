"""Benchmarks: each measures a stage against simulated truth and prints labelled numbers."""
