"""The spool core: the task format, the spool's directories and renames, the watcher, the ledger,
recovery of abandoned claims and the home. Imports only the foundation (errors, config), never a
craftsman, a backend or the worker."""
