"""The service layer: the operations a user asks for (submit, status, cancel, retry, report ...)
with no transport types. May import everything below it; the CLI, MCP and HTTP faces call it."""
