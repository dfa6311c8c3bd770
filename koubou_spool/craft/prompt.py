"""What is sent to a craftsman for a task: the chat messages. Pure."""

from __future__ import annotations

import json
from typing import Any

from .attach import Attachment
from ..spool.task import Task


def messages_for(task: Task, default_system: str | None = None,
                 attachments: list[Attachment] = ()) -> list[dict[str, Any]]:
    """Chat messages for a task: Batch lines keep their own; others get system, context, files,
    content."""
    if task.messages is not None:
        return task.messages
    messages = []
    system = task.system if task.system is not None else default_system
    if system:
        messages.append({"role": "system", "content": system})
    content = task.content
    if task.context:
        context = json.dumps(task.context, ensure_ascii=False, indent=1)
        content = f"{content}\n\nContext:\n```json\n{context}\n```"
    for attachment in attachments:
        content = f"{content}\n\nFile {attachment.path}:\n```\n{attachment.text}\n```"
    messages.append({"role": "user", "content": content})
    return messages
