"""koubou-spool: a crash-safe file spool between a master agent and its LLM craftsmen."""

__version__ = "0.1.0"
