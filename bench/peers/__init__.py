"""Helpers for bench/compare.py: the peer systems it measures koubou-spool against."""
