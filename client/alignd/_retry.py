"""When and how long to retry: one policy shared by the sync and the async client.

Retried: connection errors, timeouts, and the statuses 429, 502, 503, 504 (or any status whose response
says ``x-should-retry: true``; ``x-should-retry: false`` forbids it). The wait is the server's
``Retry-After`` (seconds, or an HTTP date; capped at :data:`MAX_RETRY_AFTER`) when it sends one, otherwise
exponential backoff with full jitter: ``uniform(0, min(MAX_BACKOFF, INITIAL_BACKOFF * 2**attempt))``.
"""

from __future__ import annotations

import email.utils
import random
import time
import uuid

import httpx

INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 8.0
MAX_RETRY_AFTER = 60.0
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


def should_retry_response(response: httpx.Response) -> bool:
    header = response.headers.get("x-should-retry", "").strip().lower()
    if header == "true":
        return True
    if header == "false":
        return False
    return response.status_code in RETRYABLE_STATUSES


def parse_retry_after(headers: httpx.Headers | None, *, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, or None. Accepts ``retry-after-ms``, seconds, or an HTTP date."""
    if headers is None:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            value = float(raw_ms) / 1000.0
            if value >= 0:
                return value
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    raw = raw.strip()
    try:
        value = float(raw)
        return value if value >= 0 else None
    except ValueError:
        pass
    parsed = email.utils.parsedate_tz(raw)
    if parsed is None:
        return None
    when = email.utils.mktime_tz(parsed)
    return max(0.0, float(when - (time.time() if now is None else now)))


def backoff_delay(attempt: int, *, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff for the retry after ``attempt`` failed tries (0-based)."""
    ceiling = min(MAX_BACKOFF, INITIAL_BACKOFF * (2.0 ** max(0, attempt)))
    return (rng or random).uniform(0.0, ceiling)


def retry_delay(attempt: int, response: httpx.Response | None = None) -> float:
    """How long to sleep before the next try: the server's Retry-After (capped) or jittered backoff."""
    if response is not None:
        server_says = parse_retry_after(response.headers)
        if server_says is not None:
            return min(server_says, MAX_RETRY_AFTER)
    return backoff_delay(attempt)


def new_idempotency_key() -> str:
    return f"alignd-{uuid.uuid4().hex}"
