"""Values <-> rows <-> cached bytes, with orjson (never pickle) and an optional schema.

A value is a mapping of the value columns, or an instance of ``schema`` when one is given:
a dataclass or a pydantic model (if pydantic is installed). The schema is checked when a
value is read from Redis; an entry that does not decode or does not validate is treated as
a miss by the store (and counted), never returned.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

__all__ = ["CorruptValue", "RowCodec"]


class CorruptValue(ValueError):
    """Cached bytes that are not valid JSON or do not match the schema."""


class RowCodec:
    """Encode and decode the value columns of one table.

    Args:
        columns: the value columns, in table order.
        schema: optional dataclass or pydantic model type; values are returned as instances.
    """

    def __init__(self, columns: Sequence[str], schema: type[Any] | None = None) -> None:
        self.columns = tuple(columns)
        self.schema = schema
        self._is_dataclass = schema is not None and dataclasses.is_dataclass(schema)
        self._is_pydantic = schema is not None and hasattr(schema, "model_validate")
        if schema is not None and not (self._is_dataclass or self._is_pydantic):
            raise TypeError(f"schema must be a dataclass or a pydantic model, got {schema!r}")
        self._checks: dict[str, tuple[type, ...]] = {}
        if self._is_dataclass and schema is not None:
            hints = typing.get_type_hints(schema)
            for f in dataclasses.fields(schema):
                hint = hints.get(f.name)
                # Plain classes are checked with isinstance; generics and unions are not.
                if isinstance(hint, type) and hint is not typing.Any:
                    self._checks[f.name] = (int, float) if hint is float else (hint,)

    def to_row(self, value: Any) -> dict[str, Any]:
        """The value as ``{column: python value}``, in column order."""
        if self._is_pydantic:
            raw = value.model_dump(mode="json")
        elif self._is_dataclass and not isinstance(value, Mapping):
            raw = dataclasses.asdict(value)
        elif isinstance(value, Mapping):
            raw = value
        else:
            raise TypeError(f"expected a mapping of {self.columns}, got {type(value).__name__}")
        missing = [c for c in self.columns if c not in raw]
        if missing:
            raise ValueError(f"value lacks column(s) {missing}; expected {list(self.columns)}")
        return {c: raw[c] for c in self.columns}

    def dumps(self, row: Mapping[str, Any]) -> bytes:
        """Serialize a row for the cache."""
        return orjson.dumps(row)

    def loads(self, payload: bytes) -> Any:
        """Deserialize cached bytes into a value (schema instance when configured).

        Raises:
            CorruptValue: not JSON, not an object, or rejected by the schema.
        """
        try:
            raw = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise CorruptValue(f"cached value is not JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise CorruptValue(f"cached value is a {type(raw).__name__}, expected an object")
        return self.from_mapping(raw)

    def from_mapping(self, raw: dict[str, Any]) -> Any:
        """Build the value from a decoded mapping, validating it against the schema."""
        if self.schema is None:
            return raw
        try:
            if self._is_pydantic:
                return self.schema.model_validate(raw)
            for name, kind in self._checks.items():
                if name in raw and raw[name] is not None and not isinstance(raw[name], kind):
                    got, want = type(raw[name]).__name__, kind[-1].__name__
                    raise CorruptValue(f"field {name!r} is {got}, expected {want}")
            return self.schema(**raw)
        except CorruptValue:
            raise
        except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            raise CorruptValue(
                f"cached value does not match {self.schema.__name__}: {exc}"
            ) from exc
