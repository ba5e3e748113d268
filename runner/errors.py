"""Exceptions shared by the runner's config and plugin layers."""

from __future__ import annotations

from typing import Iterable


class ConfigError(Exception):
    """One or more problems in a runner configuration.

    ``messages`` is the full list, each already formatted as
    ``FILE:LINE: KEY.PATH: what is wrong (what was expected)``; ``str(err)``
    joins them with newlines so the whole list can be printed at once.
    """

    def __init__(self, messages: str | Iterable[str]):
        if isinstance(messages, str):
            messages = [messages]
        self.messages: list[str] = list(messages)
        super().__init__("\n".join(self.messages))
