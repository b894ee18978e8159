"""Label Studio credentials on raw GETs: legacy tokens and personal access tokens.

A legacy token goes out as `Authorization: Token <key>`. A personal access token is a JWT *refresh*
token: it is exchanged at POST /api/token/refresh/ for a 5-minute access token, sent as `Bearer <access>`,
cached, and exchanged again when Label Studio answers 401.

Not label-studio-sdk's client: its refresh lives on private attributes (client._client_wrapper._tokens_client),
is driven by the token's `exp` claim only (no re-refresh on 401), and drops any path in LABEL_STUDIO_URL.
"""

from __future__ import annotations

import threading
from collections.abc import Generator

import httpx

from backend.errors import ImageFetchError

# Besides 5xx, the statuses that say "later": request timeout, too many requests.
_RETRYABLE_STATUS = frozenset({408, 429})


def is_personal_access_token(api_key: str) -> bool:
    """Personal access tokens are JWTs (base64 of '{"' = "eyJ"); legacy tokens are 40 hex digits."""
    return api_key.startswith("eyJ")


def request_failure(source: str, exc: httpx.RequestError) -> ImageFetchError:
    """An httpx transport failure as ImageFetchError: timeouts and connection errors are retryable."""
    if isinstance(exc, httpx.TimeoutException):
        return ImageFetchError(f"{source}: timed out ({type(exc).__name__})", retryable=True)
    retryable = isinstance(exc, httpx.TransportError) and not isinstance(exc, httpx.UnsupportedProtocol)
    return ImageFetchError(f"{source}: request failed ({type(exc).__name__}: {exc})", retryable=retryable)


class LabelStudioAuth(httpx.Auth):
    """httpx auth for requests to Label Studio itself (the caller attaches it only to that origin).

    Thread-safe: one access token is shared, and concurrent 401s cause one refresh, not one each.
    """

    def __init__(self, api_key: str, label_studio_url: str, client: httpx.Client) -> None:
        self._api_key = api_key
        self._refresh_url = label_studio_url.rstrip("/") + "/api/token/refresh/"
        self._client = client
        self._lock = threading.Lock()
        self._access: str | None = None

    @property
    def rejection_hint(self) -> str:
        """What to check when Label Studio answers 401/403 to a request carrying these credentials."""
        if is_personal_access_token(self._api_key):
            return (
                "LABEL_STUDIO_API_KEY was used as a personal access token and refused: check that its user "
                "can open this project"
            )
        return (
            "LABEL_STUDIO_API_KEY was sent as a legacy token and refused: legacy tokens are off by default since "
            "Label Studio 1.23 (enable them for the organization) — or use a personal access token"
        )

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if not is_personal_access_token(self._api_key):
            request.headers["Authorization"] = f"Token {self._api_key}"
            yield request
            return
        access = self._access_token(rejected=None)
        request.headers["Authorization"] = f"Bearer {access}"
        response = yield request
        if response.status_code == 401:  # expired (5-minute lifetime) or revoked: refresh once
            request.headers["Authorization"] = f"Bearer {self._access_token(rejected=access)}"
            yield request

    def _access_token(self, rejected: str | None) -> str:
        """The cached access token, refreshed when there is none or it is the one just `rejected`."""
        with self._lock:
            if self._access is None or self._access == rejected:
                self._access = self._refresh()
            return self._access

    def _refresh(self) -> str:
        source = f"refreshing the personal access token at {self._refresh_url}"
        try:
            response = self._client.post(self._refresh_url, json={"refresh": self._api_key})
        except httpx.RequestError as exc:
            raise request_failure(source, exc) from exc
        if response.status_code != 200:
            raise ImageFetchError(
                f"{source}: HTTP {response.status_code}; LABEL_STUDIO_API_KEY looks like a personal access token "
                "(a JWT) but Label Studio would not exchange it: it may be expired or revoked",
                retryable=retryable_status(response.status_code),
            )
        try:
            access = response.json()["access"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ImageFetchError(f"{source}: the answer has no access token") from exc
        if not isinstance(access, str) or not access:
            raise ImageFetchError(f"{source}: the answer has no access token")
        return access


def retryable_status(status: int) -> bool:
    """Whether an HTTP error status is transient: 5xx, 408 or 429."""
    return status >= 500 or status in _RETRYABLE_STATUS
