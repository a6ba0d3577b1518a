"""Rendering for the CLI: readable tables by default, ``-o json`` and ``-o yaml`` for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

Column = tuple[str, Callable[[dict[str, Any]], Any]]


def col(header: str, key: str) -> Column:
    """A column that shows ``key`` (dotted for nested fields)."""

    def get(item: dict[str, Any]) -> Any:
        value: Any = item
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    return header, get


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ",".join(_cell(v) for v in value) or "-"
    return str(value)


def builtins(data: Any) -> Any:
    return msgspec.to_builtins(data)


def emit(data: Any, fmt: str, columns: Sequence[Column] | None = None) -> None:
    """Print ``data`` (a Struct, list of Structs, dict or list) in format ``fmt``."""
    plain = builtins(data)
    if fmt == "json":
        print(json.dumps(plain, indent=2, ensure_ascii=False))
    elif fmt == "yaml":
        import yaml

        print(yaml.safe_dump(plain, sort_keys=False, allow_unicode=True), end="")
    elif isinstance(plain, list):
        table(plain, columns or [])
    else:
        details(plain)


def table(items: list[dict[str, Any]], columns: Sequence[Column]) -> None:
    headers = [h for h, _ in columns]
    rows = [[_cell(get(item)) for _, get in columns] for item in items]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    out = sys.stdout
    out.write("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip() + "\n")
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def details(obj: dict[str, Any], indent: int = 0) -> None:
    """A vertical key: value listing for one object, nested objects indented."""
    width = max((len(k) for k in obj), default=0)
    pad = " " * indent
    for key, value in obj.items():
        if isinstance(value, dict) and value and any(isinstance(v, dict | list) for v in value.values()):
            print(f"{pad}{key}:")
            details(value, indent + 2)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{pad}{key}:")
            for i, item in enumerate(value):
                print(f"{pad}  - [{i}]")
                details(item, indent + 4)
        else:
            print(f"{pad}{(key + ':').ljust(width + 1)} {_cell(value)}")
