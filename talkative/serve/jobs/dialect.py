"""Where the stores' SQL differs between SQLite and PostgreSQL, as data: one `Dialect` per backend.

The stores write one SQL text for both backends: `?` placeholders, `INSERT ... ON CONFLICT (...) DO UPDATE`,
`RETURNING`, standard types. What cannot be written portably is asked of the dialect: the placeholder style, the
database clock (leases compare against one clock, shared by every replica, instead of each machine's own), JSON
reads of the text columns, a NULL-safe comparison, and the floating-point type of the schema (PostgreSQL's `REAL`
is single precision: a timestamp would lose its seconds).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dialect:
    name: str
    #: what a `?` of the stores' SQL becomes (psycopg binds `%s`)
    placeholder: str
    #: seconds since the epoch on the database server's clock, as a double
    now: str
    #: `{column}` is a JSON text column, `{path}` a dotted path: the scalar there as text (NULL for a JSON null).
    #: PostgreSQL refuses to read a document holding an escaped NUL (`\\u0000`, which any text may hold) through
    #: its JSON operators, so its templates read a copy with each one turned into U+FFFD: only the stored text keeps
    #: the NUL, and the values read this way (ids, summaries, lengths) never hold one
    json_text_template: str
    #: the same for an object or array: its JSON text (a JSON null may come back as NULL or as `null`)
    json_document_template: str
    #: the length of the JSON array at `{path}` of `{column}` (NULL when there is none)
    json_length_template: str
    #: `a <same> b` is true when both are NULL or both equal (`owner IS ?` only works on SQLite)
    same: str
    #: the schema's type for timestamps and other doubles
    double: str

    def sql(self, text: str) -> str:
        """The stores' SQL for this backend. A literal `%` is escaped for psycopg; the stores' SQL has no `?` or `%`
        inside string literals, so a plain replacement is exact."""
        if self.placeholder == "?":
            return text
        return text.replace("%", "%%").replace("?", self.placeholder)

    def json_text(self, column: str, path: str) -> str:
        return self.json_text_template.format(column=column, path=self._path(path))

    def json_document(self, column: str, path: str) -> str:
        return self.json_document_template.format(column=column, path=self._path(path))

    def json_length(self, column: str, path: str) -> str:
        return self.json_length_template.format(column=column, path=self._path(path))

    def _path(self, dotted: str) -> str:
        return f"$.{dotted}" if self.name == "sqlite" else "{" + dotted.replace(".", ",") + "}"

    def schema(self, statement: str) -> str:
        """A schema statement with `{double}` filled in."""
        return statement.format(double=self.double)


SQLITE = Dialect(
    name="sqlite",
    placeholder="?",
    now="((julianday('now') - 2440587.5) * 86400.0)",
    json_text_template="json_extract({column}, '{path}')",
    json_document_template="json_extract({column}, '{path}')",
    json_length_template="json_array_length({column}, '{path}')",
    same="IS",
    double="REAL",
)

POSTGRESQL = Dialect(
    name="postgresql",
    placeholder="%s",
    now="CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)",
    json_text_template="(CAST(replace({column}, '\\u0000', '\\ufffd') AS json) #>> '{path}')",
    json_document_template="CAST(CAST(replace({column}, '\\u0000', '\\ufffd') AS json) #> '{path}' AS text)",
    json_length_template="json_array_length(CAST(replace({column}, '\\u0000', '\\ufffd') AS json) #> '{path}')",
    same="IS NOT DISTINCT FROM",
    double="DOUBLE PRECISION",
)


def upsert(table: str, columns: tuple[str, ...], key: str) -> str:
    """Insert a row, or update the named columns of the row with the same `key` (both backends). Unlike SQLite's
    INSERT OR REPLACE, columns not named keep their values: a job's lease survives its record being written."""
    marks = ", ".join("?" * len(columns))
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != key)
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) ON CONFLICT ({key}) DO UPDATE SET {updates}"
