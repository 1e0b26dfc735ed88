"""The failures karma8 can report, as types.

Every failure a client or an operator can see has a class here with a stable ``code``. The HTTP
edge maps codes to statuses (karma8/net); the simulated network carries ``(code, message)`` pairs
and rebuilds the same class on the other side, so an actor cannot tell which world raised it.
Messages are written for the person reading them and never include internals (paths, stacks).
A message may name a node's address, which the public HTTP edge does not show a client: there a
5xx says only its kind, or ``public``, a part of the message written to be shown (which part of
which file, on which node id, and why).
"""

from __future__ import annotations

from typing import ClassVar, Self


class Karma8Error(Exception):
    """Base of every karma8 failure. ``code`` is stable and machine-readable."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, public: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # What a client of the public API may be told of this failure if it is a 5xx (no
        # internal address); None: only what kind of failure it was.
        self.public = public

    @classmethod
    def told(cls, public: str, cause: str | None = None) -> Self:
        """An error whose message is ``public``, to be shown to any client, followed by
        ``cause`` (a peer's message, for the log)."""
        return cls(public if not cause else f"{public} ({cause})", public=public)


class NotFound(Karma8Error):
    """A namespace, file, upload or part that does not exist."""

    code = "not_found"


class InvalidName(Karma8Error):
    """A namespace or file name that breaks the naming rules."""

    code = "invalid_name"


class InvalidRequest(Karma8Error):
    """A malformed request: bad body, short body, bad header, bad parameter."""

    code = "invalid_request"


class TooLarge(Karma8Error):
    """A body larger than the configured limit or than the cluster can take."""

    code = "too_large"


class Unauthorized(Karma8Error):
    """No valid credentials: a private namespace without a token, or an unknown, wrong or
    revoked token."""

    code = "unauthorized"


class Forbidden(Karma8Error):
    """The caller may not do this: a token without the right, or of another namespace; a
    wrong cluster secret."""

    code = "forbidden"


class PreconditionFailed(Karma8Error):
    """A conditional request whose condition does not hold."""

    code = "precondition_failed"


class RangeNotSatisfiable(Karma8Error):
    """A Range that does not overlap the file."""

    code = "range_not_satisfiable"


class UploadConflict(Karma8Error):
    """An upload that can no longer commit (expired, aborted or already committed)."""

    code = "upload_conflict"


class MoveConflict(Karma8Error):
    """A part move that can no longer happen or finish (the part changed, the lease ran out)."""

    code = "move_conflict"


class NodeConflict(Karma8Error):
    """A storage node id heard from a second place while the first still heartbeats: two
    processes serve copies of one node's directory."""

    code = "node_conflict"


class NodeForgotten(Karma8Error):
    """A storage node id the operator forgot (``karma8 nodes forget``) registers or
    heartbeats again: its parts were written off; its directory must be wiped and the node
    started as a new one."""

    code = "node_forgotten"


class NodeNotGone(Karma8Error):
    """``karma8 nodes forget`` of a node discovery still hears (or heard within
    ``node_timeout``): only an unavailable node can be forgotten."""

    code = "node_not_gone"


class NotEnoughNodes(Karma8Error):
    """Fewer available storage nodes with room than a file needs parts."""

    code = "not_enough_nodes"


class StorageFailure(Karma8Error):
    """A storage node failed while reading or writing a part."""

    code = "storage_failure"


class IntegrityError(Karma8Error):
    """Bytes that do not match their recorded size or checksum."""

    code = "integrity_error"


class Unavailable(Karma8Error):
    """A service that could not be reached or did not answer."""

    code = "unavailable"


class DiskFull(Karma8Error):
    """A storage node out of space."""

    code = "disk_full"


ERROR_TYPES: dict[str, type[Karma8Error]] = {
    cls.code: cls
    for cls in (
        Karma8Error,
        NotFound,
        InvalidName,
        InvalidRequest,
        TooLarge,
        Unauthorized,
        Forbidden,
        PreconditionFailed,
        RangeNotSatisfiable,
        UploadConflict,
        MoveConflict,
        NodeConflict,
        NodeForgotten,
        NodeNotGone,
        NotEnoughNodes,
        StorageFailure,
        IntegrityError,
        Unavailable,
        DiskFull,
    )
}


def error_from_code(code: str, message: str) -> Karma8Error:
    """Rebuild an error received from another actor; unknown codes become the base class."""
    return ERROR_TYPES.get(code, Karma8Error)(message)
