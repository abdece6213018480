"""The provider's refusals: an HTTP status plus the contract's stable error code and a readable message."""

from __future__ import annotations


class ProviderError(Exception):
    """A request the provider refuses; answered as `{"error": {"code", "message"}}` with `status`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


def invalid_body(message: str) -> ProviderError:
    return ProviderError(400, "invalid_body", message)


def sandbox_not_found(sandbox_id: str) -> ProviderError:
    return ProviderError(404, "sandbox_not_found", f"no sandbox {sandbox_id}")


def snapshot_not_found(snapshot_id: str) -> ProviderError:
    return ProviderError(404, "snapshot_not_found", f"no live snapshot {snapshot_id}; it may have expired")


def image_not_found(image_id: str) -> ProviderError:
    return ProviderError(404, "image_not_found", f"no image {image_id}; it may have been deleted")
