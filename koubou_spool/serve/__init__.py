"""`koubou serve`: the HTTP face (README: koubou serve). One Starlette app over the service layer:
the OpenAI-compatible API, the Batch API, REST, events, metrics and the dashboard.
May import the integrations, the service layer and everything below them."""
