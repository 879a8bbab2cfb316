"""A Python client for ``modalforge serve``.

    from modalforge.client import Client

    client = Client("http://127.0.0.1:8000", api_key=None)
    client.predict(image="grinning.png", text="grinning face", audio="grinning.flac")
    # {"label": "Smileys & Emotion", "confidence": 0.96, "probabilities": {...},
    #  "contributions": {...}, "modalities": [...], "model": "demo", "version": "..."}

Files go as multipart uploads (no base64 overhead); ``predict_batch`` sends many samples in one
JSON call. A refused request raises ``ServerError`` with the server's status and message.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import httpx

FileLike = str | os.PathLike | bytes


class ServerError(RuntimeError):
    """A request the server refused (4xx) or failed (5xx)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.param = param


class Client:
    def __init__(
        self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self._inputs: dict[str, str] | None = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- routes ---------------------------------------------------------------------------------
    def models(self) -> list[dict[str, Any]]:
        return self._check(self.http.get("/v1/models"))["data"]

    def health(self) -> bool:
        return self.http.get("/healthz").status_code == 200

    def ready(self) -> bool:
        return self.http.get("/readyz").status_code == 200

    def predict(
        self,
        image: FileLike | None = None,
        text: str | None = None,
        audio: FileLike | None = None,
        **columns: Any,
    ) -> dict[str, Any]:
        """One sample. ``image`` / ``text`` / ``audio`` go to the model's first column of that
        type; other columns by name (``**columns``). A file is a path or its bytes."""
        fields = self._by_column(image=image, text=text, audio=audio, **columns)
        files, data = {}, {}
        for name, value in fields.items():
            if self._inputs.get(name) in ("image", "audio"):  # type: ignore[union-attr]
                files[name] = (_filename(value, name), _read(value))
            else:
                data[name] = value if isinstance(value, str) else str(value)
        if not files:  # no file: JSON (a form without files would be url-encoded)
            return self._check(self.http.post("/v1/predict", json=fields))
        return self._check(self.http.post("/v1/predict", files=files, data=data))

    def predict_batch(self, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Many samples (dicts of column -> value; files as paths or bytes) in one call."""
        self._by_column()
        inputs = []
        for sample in samples:
            item = {}
            for name, value in sample.items():
                if value is None:
                    continue
                if self._inputs.get(name) in ("image", "audio"):  # type: ignore[union-attr]
                    item[name] = base64.b64encode(_read(value)).decode("ascii")
                else:
                    item[name] = value
            inputs.append(item)
        return self._check(self.http.post("/v1/predict/batch", json={"inputs": inputs}))[
            "predictions"
        ]

    # -- helpers --------------------------------------------------------------------------------
    def _by_column(self, **given: Any) -> dict[str, Any]:
        if self._inputs is None:
            card = self.models()[0]
            self._inputs = {c["name"]: c["type"] for c in card["inputs"]}
        fields = {}
        for key, value in given.items():
            if value is None:
                continue
            if key in self._inputs:
                fields[key] = value
                continue
            matches = [n for n, t in self._inputs.items() if t == key]
            if not matches:
                raise ValueError(f"the served model has no {key} input (it reads {self._inputs})")
            fields[matches[0]] = value
        return fields

    @staticmethod
    def _check(response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                raise ServerError(response.status_code, error["message"], error.get("param"))
            except (ValueError, KeyError, TypeError):
                raise ServerError(response.status_code, response.text[:500]) from None
        return response.json()


def _read(value: FileLike) -> bytes:
    return bytes(value) if isinstance(value, bytes | bytearray) else Path(value).read_bytes()


def _filename(value: FileLike, name: str) -> str:
    return name if isinstance(value, bytes | bytearray) else Path(value).name
