"""Faces and formats for other programs: the MCP server and the OpenAI Batch format.
May import the service layer and everything below it; holds no logic of its own beyond the protocol."""
