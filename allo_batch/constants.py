"""Facts of the Allo v2 API that both the client and the sandbox rely on.

This is the only module the client and the sandbox share, so that a bug in one side's
behaviour is caught by the other (DESIGN §1). Sources: ``shared/reference/allo-api.md``.
"""

from __future__ import annotations

from typing import Final

DEFAULT_BASE_URL: Final = "https://api.withallo.com"

ME_PATH: Final = "/v2/api/me"
ITEM_PATH: Final = "/v2/api/conversations/items/{id}"
SUMMARY_PATH: Final = "/v2/api/conversations/items/{id}/summary"
BATCH_PATH: Final = "/v2/api/conversations/items/batch"

AUTH_SCHEME: Final = "Api-Key"
WRITE_SCOPE: Final = "CONVERSATIONS_WRITE"
READ_SCOPE: Final = "CONVERSATIONS_READ"

CALL_PREFIX: Final = "cll-"
SMS_PREFIX: Final = "msg-"

TEMPLATE_KEYS: Final = ("MARKDOWN_CLASSIC", "MARKDOWN_SHORT_CALL")
MAX_CONTENT_CHARS: Final = 100_000
MAX_BATCH_IDS: Final = 100

DEFAULT_WRITE_PER_SECOND: Final = 5
DEFAULT_READ_PER_SECOND: Final = 20

HEADER_LIMIT: Final = "X-RateLimit-Limit"
HEADER_REMAINING: Final = "X-RateLimit-Remaining"
HEADER_RESET: Final = "X-RateLimit-Reset"
HEADER_RETRY_AFTER: Final = "Retry-After"


class Code:
    """The API's stable error codes used by allo-batch (allo-api.md §1, §2)."""

    UNAUTHORIZED: Final = "UNAUTHORIZED"
    API_KEY_INVALID: Final = "API_KEY_INVALID"
    API_KEY_REVOKED: Final = "API_KEY_REVOKED"
    API_KEY_INSUFFICIENT_SCOPE: Final = "API_KEY_INSUFFICIENT_SCOPE"
    INVALID_ITEM_ID: Final = "INVALID_ITEM_ID"
    INVALID_REQUEST_BODY: Final = "INVALID_REQUEST_BODY"
    UNSUPPORTED_MEDIA_TYPE: Final = "UNSUPPORTED_MEDIA_TYPE"
    SUMMARY_TEMPLATE_KEY_REQUIRED: Final = "SUMMARY_TEMPLATE_KEY_REQUIRED"
    CONVERSATION_ITEM_NOT_FOUND: Final = "CONVERSATION_ITEM_NOT_FOUND"
    SUMMARY_TEMPLATE_NOT_FOUND: Final = "SUMMARY_TEMPLATE_NOT_FOUND"
    BATCH_TOO_LARGE: Final = "BATCH_TOO_LARGE"
    RATE_LIMIT_EXCEEDED: Final = "RATE_LIMIT_EXCEEDED"
    INTERNAL_SERVER_ERROR: Final = "INTERNAL_SERVER_ERROR"
    ENDPOINT_NOT_FOUND: Final = "ENDPOINT_NOT_FOUND"
    METHOD_NOT_ALLOWED: Final = "METHOD_NOT_ALLOWED"


ERROR_TYPES: Final = {
    400: "validation_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "validation_error",
    409: "conflict_error",
    415: "validation_error",
    429: "rate_limit_error",
    500: "server_error",
}

# Idempotency on the summary PATCH is undocumented (allo-api.md §5). The pages name the request
# header for other endpoints; the replay marker is only a second-hand claim. Shared so that the
# client and the sandbox spell them alike.
HEADER_IDEMPOTENCY_KEY: Final = "Idempotency-Key"
HEADER_IDEMPOTENCY_REPLAYED: Final = "Idempotency-Replayed"
