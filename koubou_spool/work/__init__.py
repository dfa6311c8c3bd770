"""The worker: the loop that ties intake, dispatch, the attempt and publishing together.
May import the spool core, the craft and ops' systemd notifier; nothing imports it but the CLI."""
