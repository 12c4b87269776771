"""A small Server-Sent Events parser (the WHATWG event-stream format), fed line by line."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Feed it lines (without their newline); it returns an event at each blank line that ends one."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self.last_event_id: str | None = None

    def feed(self, line: str) -> ServerSentEvent | None:
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment / keep-alive
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        if self._id is not None:
            self.last_event_id = self._id
        if not self._data and self._event is None:
            self._id = None
            return None
        event = ServerSentEvent(
            data="\n".join(self._data),
            event=self._event or "message",
            id=self.last_event_id,
            retry=self._retry,
        )
        self._data, self._event, self._id, self._retry = [], None, None, None
        return event

    def flush(self) -> ServerSentEvent | None:
        """At the end of the stream: an unterminated event is dropped, as the spec says."""
        self._data, self._event, self._id, self._retry = [], None, None, None
        return None
