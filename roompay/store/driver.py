"""The hot path's prebuilt statements, run by psycopg itself on PostgreSQL.

`Connection.execute` spends more CPU around a small prepared statement than psycopg
spends running it: the compiled-cache lookup, building the parameters anew, the
execution context and the result wrapper (docs/performance.md). The hot path's
statements never change, so each is compiled here once, with what SQLAlchemy would do
to its parameters (JSON, UTC timestamps) and to its results, and psycopg runs it on
the session's own connection, inside the session's transaction, as a server-side
prepared statement. SQLite takes `Connection.execute` as before.
"""

import threading
from collections import namedtuple
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Dialect
from sqlalchemy.sql.expression import Executable

Processor = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class _Prepared:
    """One statement as psycopg runs it."""

    sql: str
    constants: dict[str, Any]
    """Values SQLAlchemy bound at build time (literals written into the statement)."""
    parameters: tuple[tuple[str, Processor], ...]
    """The parameters whose type converts the value first (JSON, UTC timestamps)."""
    row: type[tuple[Any, ...]] | None
    """A named tuple of the columns returned, or None if nothing is."""
    results: tuple[Processor | None, ...]


_prepared: dict[int, tuple[Executable, _Prepared]] = {}
_lock = threading.Lock()


def rows(conn: Connection, statement: Executable, params: Mapping[str, Any]) -> list[Any]:
    """Run a prebuilt statement in `conn`'s transaction; every row it returns.

    Rows have the columns as attributes, as SQLAlchemy's do. On PostgreSQL psycopg runs
    it directly (see the module's docstring); elsewhere `conn.execute` does.
    """
    if conn.dialect.name != "postgresql":
        return list(conn.execute(statement, params))
    prepared = _prepare(statement, conn.dialect)
    values = prepared.constants | dict(params)
    for name, process in prepared.parameters:
        values[name] = process(values[name])
    driver = conn.connection.driver_connection
    assert driver is not None  # a connection in a transaction is checked out
    with driver.cursor() as cursor:
        cursor.execute(prepared.sql, values, prepare=True)
        if prepared.row is None:
            return []
        fetched = cursor.fetchall()
    return [_row(prepared, row) for row in fetched]


def first(conn: Connection, statement: Executable, params: Mapping[str, Any]) -> Any | None:
    """The statement's first row, or None (see `rows`)."""
    found = rows(conn, statement, params)
    return found[0] if found else None


def _row(prepared: _Prepared, values: tuple[Any, ...]) -> Any:
    assert prepared.row is not None
    return prepared.row(
        *(
            value if process is None or value is None else process(value)
            for value, process in zip(values, prepared.results, strict=True)
        )
    )


def _prepare(statement: Executable, dialect: Dialect) -> _Prepared:
    """The statement compiled for psycopg: once per statement object, kept for the process."""
    known = _prepared.get(id(statement))
    if known is not None and known[0] is statement:
        return known[1]
    prepared = _compile(statement, dialect)
    with _lock:
        # The statement is kept with it so that its id cannot be reused by another.
        _prepared[id(statement)] = (statement, prepared)
    return prepared


def _compile(statement: Executable, dialect: Dialect) -> _Prepared:
    compiled = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
    if compiled.post_compile_params or compiled.positiontup:
        raise ValueError("a statement run by the driver takes named, non-expanding parameters")
    constants: dict[str, Any] = {}
    parameters: list[tuple[str, Processor]] = []
    for bind, name in compiled.bind_names.items():
        if not bind.required:
            constants[name] = bind.effective_value
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            if bind.required:
                parameters.append((name, process))
            else:
                constants[name] = process(constants[name])
    columns = list(getattr(statement, "exported_columns", ()))
    returns = bool(columns)
    return _Prepared(
        sql=compiled.string,
        constants=constants,
        parameters=tuple(parameters),
        row=namedtuple("Row", [column.key for column in columns]) if returns else None,
        results=tuple(
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
        )
        if returns
        else (),
    )
