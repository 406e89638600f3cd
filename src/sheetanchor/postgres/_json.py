"""JSON and JSONB that bind natively: pass a ``dict`` or ``list``, get one back.

Plain asyncpg refuses a ``dict`` for a ``jsonb`` parameter (``expected str, got dict``, incident
000) and SQLAlchemy's asyncpg dialect installs codecs that only accept text. The codecs here are
installed on every new pooled connection, after SQLAlchemy's own, and use orjson both ways:

* ``dict``, ``list``, numbers, ``bool`` and ``None`` are encoded as JSON;
* ``str`` is taken as JSON text that is already encoded (what SQLAlchemy's ``JSON`` type and
  existing code pass), ``bytes`` likewise; to store a JSON *string* value, pass
  ``orjson.dumps("text")``.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

__all__ = ["decode_json", "decode_jsonb", "encode_json", "encode_jsonb", "install_json_codecs"]

_JSONB_VERSION = b"\x01"


def encode_json(value: Any) -> bytes:
    """Encode ``value`` for a ``json`` parameter (binary format: the JSON text itself)."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return orjson.dumps(value)


def encode_jsonb(value: Any) -> bytes:
    """Encode ``value`` for a ``jsonb`` parameter (binary format: version byte + JSON text)."""
    return _JSONB_VERSION + encode_json(value)


def decode_json(data: bytes) -> Any:
    """Decode a ``json`` column value."""
    return orjson.loads(data)


def decode_jsonb(data: bytes) -> Any:
    """Decode a ``jsonb`` column value (drops the version byte)."""
    return orjson.loads(data[1:])


async def install_json_codecs(conn: asyncpg.Connection[Any]) -> None:
    """Make ``json``/``jsonb`` accept and return Python objects on ``conn`` (two round trips)."""
    await conn.set_type_codec(
        "json", schema="pg_catalog", encoder=encode_json, decoder=decode_json, format="binary"
    )
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=encode_jsonb, decoder=decode_jsonb, format="binary"
    )
