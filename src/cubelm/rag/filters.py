"""Metadata filters (``where=``) shared by every vector store backend, in Chroma's syntax.

``{"source": "x"}`` (equality), ``{"source": {"$in": ["x", "y"]}}``, ``$eq $ne $gt $gte $lt $lte $in $nin``,
several keys in one dict (all must hold), and ``{"$and": [...]}`` / ``{"$or": [...]}``. ``parse_where`` checks a
filter once and gives a small tree that each backend compiles: to SQL for the embedded store (SQLite's JSON1
``json_extract``), to Chroma's own where-document for the server backend (which wants ``$and`` spelled out).
"""

from __future__ import annotations

import re
from typing import Any

from cubelm.errors import CubelmError

_OPS = {"$eq": "=", "$ne": "!=", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<=", "$in": "IN", "$nin": "NOT IN"}
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
Scalar = str | int | float | bool


def _check_scalar(key: str, value: Any) -> None:
    if not isinstance(value, (str, int, float, bool)):
        raise CubelmError(f"where: the value for {key!r} must be a string, number or bool, got {type(value).__name__}")


def parse_where(where: dict | None) -> tuple | None:
    """``where`` as a tree: ("and"|"or", [children]) or ("cmp", key, op, value); None for no filter."""
    if where is None:
        return None
    if not isinstance(where, dict) or not where:
        raise CubelmError(f"where must be a non-empty dict like {{'source': 'x'}}, got {where!r}")
    clauses = []
    for key, value in where.items():
        if key in ("$and", "$or"):
            if not isinstance(value, list) or not value:
                raise CubelmError(f"where: {key} takes a non-empty list of filters")
            clauses.append((key[1:], [parse_where(v) for v in value]))
        elif key.startswith("$") or not _KEY.match(str(key)):
            raise CubelmError(f"where: bad key {key!r} (metadata keys are letters, digits, '_', '.', '-')")
        elif isinstance(value, dict):
            if len(value) != 1 or next(iter(value)) not in _OPS:
                raise CubelmError(f"where: {key!r} takes one operator of {sorted(_OPS)}, got {value!r}")
            op, arg = next(iter(value.items()))
            if op in ("$in", "$nin"):
                if not isinstance(arg, list) or not arg:
                    raise CubelmError(f"where: {op} for {key!r} takes a non-empty list")
                for a in arg:
                    _check_scalar(key, a)
            else:
                _check_scalar(key, arg)
            clauses.append(("cmp", key, op, arg))
        else:
            _check_scalar(key, value)
            clauses.append(("cmp", key, "$eq", value))
    return clauses[0] if len(clauses) == 1 else ("and", clauses)


def to_sql(tree: tuple, column: str = "metadata") -> tuple[str, list]:
    """A SQL boolean expression over a JSON text column, and its parameters."""
    if tree[0] in ("and", "or"):
        parts = [to_sql(child, column) for child in tree[1]]
        sql = f" {tree[0].upper()} ".join(f"({p})" for p, _ in parts)
        return sql, [x for _, params in parts for x in params]
    _, key, op, arg = tree
    field = f"json_extract({column}, ?)"
    path = '$."' + key + '"'  # quoted so that a '.' in a key is not read as nesting
    if op in ("$in", "$nin"):
        return f"{field} {_OPS[op]} ({', '.join('?' * len(arg))})", [path, *arg]
    return f"{field} {_OPS[op]} ?", [path, arg]


def to_chroma(tree: tuple) -> dict:
    """Chroma's where-document: one key per dict, several keys through an explicit ``$and``."""
    if tree[0] in ("and", "or"):
        children = [to_chroma(child) for child in tree[1]]
        return children[0] if len(children) == 1 else {"$" + tree[0]: children}  # Chroma wants 2+ in a list
    _, key, op, arg = tree
    return {key: {op: arg}}
