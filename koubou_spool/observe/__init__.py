"""Observation, read-only: status, reports and their rendering, metrics, top, progress.
May import the spool core (files and ledger) and the foundation; changes nothing in the spool."""
