"""What Redis, or the link to it, can raise: the wire's own errors.

scrapeq speaks RESP itself (docs/design.md), so it needs no client library
at run time; importing redis-py only for its exception classes cost ~0.15 s
of every process start (0.6 s without a bytecode cache). The names and the
hierarchy are redis-py's, so code reads the same and ``translated_errors``
(actors/connection.py) turns them into the public exceptions:

* :class:`ConnectionError` and :class:`TimeoutError`: the call may not have
  reached Redis, or its reply was lost; the connection is retried.
  ``LOADING`` (Redis is loading its data) and refused credentials are
  connection errors too: the next try may succeed.
* :class:`ResponseError`: Redis answered with an error.
"""

from __future__ import annotations

import hiredis

# The builtins are shadowed on purpose, as in redis-py: always use these
# qualified (``redis_errors.ConnectionError``).


class RedisError(Exception):
    pass


class ConnectionError(RedisError):
    pass


class TimeoutError(RedisError):
    pass


class AuthenticationError(ConnectionError):
    pass


class BusyLoadingError(ConnectionError):
    pass


class DataError(RedisError):
    """A command argument that cannot be sent (not bytes, str, int or float)."""


class ResponseError(RedisError):
    pass


class NoScriptError(ResponseError):
    pass


class OutOfMemoryError(ResponseError):
    pass


class ReadOnlyError(ResponseError):
    pass


#: Error reply prefixes with their own class; the rest are plain ResponseErrors.
_BY_CODE: dict[str, type[RedisError]] = {
    "NOSCRIPT": NoScriptError,
    "OOM": OutOfMemoryError,
    "LOADING": BusyLoadingError,
    "READONLY": ReadOnlyError,
    "NOAUTH": AuthenticationError,
    "WRONGPASS": AuthenticationError,
}


def from_reply(reply: hiredis.ReplyError) -> RedisError:
    """The exception for an error reply.

    A script's write refused by a replica comes back as ``ERR Error running
    script ... -READONLY ...`` on Redis 6.2: a read-only error all the same.
    """
    message = str(reply)
    kind = _BY_CODE.get(message.split(" ", 1)[0], ResponseError)
    if kind is ResponseError and "READONLY You can't write" in message:
        kind = ReadOnlyError
    return kind(message)
