"""A thin client for the REST API used by the CLI (and usable from scripts)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import httpx

from edge_agent.contracts.errors import EdgefleetError, TransportError


class ApiError(EdgefleetError):
    def __init__(self, status: int, code: str, message: str, detail: Any = None) -> None:
        super().__init__(message, reason=code, status=status, detail=detail)
        self.status = status


def default_token(data_dir: Path) -> str | None:
    token = os.environ.get("EDGEFLEET_TOKEN")
    if token:
        return token.strip()
    path = data_dir / "admin.token"
    return path.read_text().strip() if path.is_file() else None


class ApiClient:
    def __init__(self, base_url: str, token: str | None, timeout_s: float = 300.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._send(method, path, **kwargs)
        return resp.json() if resp.content else None

    def text(self, path: str, **kwargs: Any) -> str:
        """A GET whose answer is not JSON (``/metrics``)."""
        return self._send("GET", path, **kwargs).text

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.request("PUT", path, **kwargs)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise TransportError(
                f"cannot reach the server at {self.base_url} ({e}); is `edgefleet serve` running?"
            ) from e
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
                raise ApiError(resp.status_code, err["code"], err["message"], err.get("detail"))
            except (ValueError, KeyError, TypeError):
                raise ApiError(resp.status_code, "http_error", resp.text[:300]) from None
        return resp

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def upload_model(
        self,
        path: Path,
        name: str,
        version: str,
        description: str = "",
        *,
        calibration: Path | None = None,
        validation: Path | None = None,
        output_kinds: dict[str, str] | None = None,
        card: Path | None = None,
        meta: dict[str, str] | None = None,
        parents: list[str] | None = None,
    ) -> Any:
        with contextlib.ExitStack() as stack:
            files = {
                "file": (
                    path.name,
                    stack.enter_context(path.open("rb")),
                    "application/octet-stream",
                )
            }
            for field, extra in (
                ("calibration", calibration),
                ("validation", validation),
                ("card", card),
            ):
                if extra is not None:
                    files[field] = (
                        extra.name,
                        stack.enter_context(extra.open("rb")),
                        "application/octet-stream",
                    )
            return self.post(
                "/v1/models",
                files=files,
                data={
                    "name": name,
                    "version": version,
                    "description": description,
                    "output_kinds": json.dumps(output_kinds or {}),
                    "meta": json.dumps(meta or {}),
                    "parents": ",".join(parents or []),
                },
            )

    def close(self) -> None:
        self._http.close()
