"""One module per resource: models, chat, files, batches, tasks (REST), events, dashboard."""
