"""The craft: choosing a craftsman (router), talking to it (backends), the prompt and attachments,
prices, budgets, slots and rate limits. May import the spool core and the foundation; backends
know nothing of the spool."""
