"""Operations: maintain (cron's recovery, expiry, purge, vacuum), doctor, ledger rebuild and the
systemd notifier. May import the spool core and the craft, never the worker or the CLI."""
