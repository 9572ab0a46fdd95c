"""Endpoints named by URL in ``agent.toml`` (standard library only)."""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["mqtt_endpoint"]


def mqtt_endpoint(url: str) -> tuple[str, int, str]:
    """``mqtt://host:port/topic`` → (host, port, topic). The topic is everything after the
    first slash, as written: ``#`` and ``?`` are topic characters here, not URL syntax."""
    rest = url.split("://", 1)[1] if "://" in url else ""
    netloc, _, topic = rest.partition("/")
    parts = urlsplit(f"mqtt://{netloc}")
    try:
        port = parts.port or 1883
    except ValueError as e:
        raise ValueError(f"bad port in {url!r}") from e
    return parts.hostname or "", port, topic
