"""The fleet catalogue: a PostgreSQL database that holds the index of several boxes. Its schema
and migrations (versioned like the index's), connecting to it, and saying in one line what went
wrong — never with the password (docs/fleet.md).

psycopg is imported by the functions that talk to PostgreSQL, not at import: `redact` serves the
daemon and `status`, which must not pay for it (or fail without it).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

# Every object lives in this schema, so that the catalogue can share a database with other things.
SCHEMA = "treewatch"
# Two replicators creating or upgrading the schema at once queue on this (a transaction-level
# advisory lock, not a lock on any table: other boxes' batches go on meanwhile).
MIGRATION_LOCK = 0x7472_6565_7761_7463  # "treewatc"
CONNECT_TIMEOUT_S = 10
# Over TCP, a catalogue that vanished without closing the connection (a box unplugged, a NAT
# forgetting it) is noticed within about a minute instead of the kernel's two hours.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}

# The columns of a box's entry as the replicator sends them, in this order, with their types for
# COPY's binary format. `root` and `path` are the bytes on the box (`path` relative to `root`).
ENTRY_COLUMNS = ("root", "path", "kind", "size", "mtime_ns", "ctime_ns", "inode", "dev", "mode", "uid", "gid",
                 "nlink", "blake3", "target", "xattrs", "corrupt", "id", "seq")  # fmt: skip
ENTRY_TYPES = ("bytea", "bytea", "text", "int8", "int8", "int8", "int8", "int8", "int8", "int8", "int8",
               "int8", "bytea", "bytea", "text", "bool", "int8", "int8")  # fmt: skip

# Each migration takes the catalogue to its number, in one transaction; add, never edit a released one.
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE SCHEMA IF NOT EXISTS treewatch;
    CREATE TABLE treewatch.meta(
        id integer PRIMARY KEY CHECK (id = 1),
        version integer NOT NULL
    );
    INSERT INTO treewatch.meta VALUES (1, 0);
    -- One row per box: which load of its entries is current and how far its feed is applied.
    CREATE TABLE treewatch.boxes(
        box text PRIMARY KEY,
        epoch text NOT NULL,          -- the box's feed epoch (`status --json` -> feed.epoch)
        load_id bigint NOT NULL,      -- the snapshot load whose rows are the box's entries
        seq bigint NOT NULL,          -- the last feed seq of that epoch applied
        loaded_at timestamptz NOT NULL,
        applied_at timestamptz NOT NULL
    );
    CREATE SEQUENCE treewatch.loads;
    CREATE TABLE treewatch.entries(
        box text NOT NULL,
        load_id bigint NOT NULL,
        root bytea NOT NULL,          -- the root folder on the box, as bytes
        path bytea NOT NULL,          -- relative to root, as bytes
        kind text NOT NULL,           -- file | dir | symlink | other
        size bigint NOT NULL,
        mtime_ns bigint NOT NULL,
        ctime_ns bigint NOT NULL,
        inode bigint NOT NULL,
        dev bigint NOT NULL,
        mode bigint NOT NULL,
        uid bigint NOT NULL,
        gid bigint NOT NULL,
        nlink bigint NOT NULL,
        blake3 bytea,                 -- 32 bytes; NULL for what is not a file, or not hashed yet
        target bytea,                 -- a symlink's target
        xattrs text,                  -- JSON object (names and values as `ls --json` shows them)
        corrupt boolean NOT NULL,     -- marked by `verify` on the box when the row was sent
        id bigint NOT NULL,           -- the entry's id on the box
        seq bigint NOT NULL,          -- the feed seq that last changed it
        PRIMARY KEY (box, load_id, root, path)
    );
    -- "Where else is this content?" is an equality: a hash index answers it, and costs a load a
    -- third of what a B-tree of 32-byte random keys did (docs/benchmarks.md, F).
    CREATE INDEX entries_by_content ON treewatch.entries USING hash (blake3) WHERE blake3 IS NOT NULL;
    -- The boxes' feeds as they were applied (a snapshot brings no history).
    CREATE TABLE treewatch.changes(
        box text NOT NULL,
        epoch text NOT NULL,
        seq bigint NOT NULL,
        op text NOT NULL,             -- added | modified | metadata | renamed | deleted
        kind text NOT NULL,
        root bytea NOT NULL,
        path bytea NOT NULL,
        old_path bytea,               -- renamed: where it was
        at timestamptz NOT NULL,      -- when the box committed it
        PRIMARY KEY (box, epoch, seq)
    );
    CREATE INDEX changes_by_time ON treewatch.changes (at);
    -- For people reading the catalogue with SQL: a path as text when it is UTF-8, else escaped.
    CREATE FUNCTION treewatch.path_text(b bytea) RETURNS text LANGUAGE plpgsql IMMUTABLE STRICT AS $$
    BEGIN
        RETURN convert_from(b, 'UTF8');
    EXCEPTION WHEN others THEN
        RETURN encode(b, 'escape');
    END $$;
    CREATE FUNCTION treewatch.join_path(root bytea, path bytea) RETURNS bytea LANGUAGE sql IMMUTABLE STRICT AS $$
        SELECT CASE WHEN root = '\\x2f'::bytea THEN root || path ELSE root || '\\x2f'::bytea || path END
    $$;
    CREATE VIEW treewatch.files AS
        SELECT e.box, treewatch.path_text(treewatch.join_path(e.root, e.path)) AS path, e.kind, e.size,
               to_timestamp(e.mtime_ns / 1e9) AS mtime, e.blake3, encode(e.blake3, 'hex') AS blake3_hex,
               treewatch.join_path(e.root, e.path) AS path_bytes
        FROM treewatch.entries e JOIN treewatch.boxes b ON b.box = e.box AND b.load_id = e.load_id;
    """,
}
CATALOGUE_VERSION = max(MIGRATIONS)


class CatalogueError(Exception):
    """The catalogue cannot be used: one line naming it (without its password) and the reason."""


def redact(url: str) -> str:
    """The catalogue's URL or conninfo string as it may be shown and logged: without a password."""
    text = url.strip()
    if re.match(r"^postgres(ql)?://", text):
        scheme, rest = text.split("://", 1)
        authority, sep, tail = rest.partition("/")
        if not sep:
            authority, sep, tail = rest.partition("?")
        if "@" in authority:
            user, host = authority.rsplit("@", 1)
            authority = user.split(":", 1)[0] + "@" + host
        tail = re.sub(r"(^|[?&])password=[^&]*&?", r"\1", tail).rstrip("&?")
        return f"{scheme}://{authority}{sep}{tail}" if tail or sep == "/" else f"{scheme}://{authority}"
    # conninfo: key = value pairs, a value possibly quoted with backslash escapes
    return re.sub(r"\s*\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|\S*)", "", text).strip()


def _secret(url: str) -> str | None:
    """The password written in ``url``, to scrub it from any message that might echo it."""
    found = re.search(r"\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|[^\s&]*)", url)
    if found:
        return found.group(1).strip("'") or None
    found = re.match(r"^postgres(?:ql)?://([^@/?]*)@", url.strip())
    if found and ":" in found.group(1):
        return found.group(1).split(":", 1)[1] or None
    return None


def reason(error: BaseException, url: str) -> str:
    """What went wrong, as one line: the first line of PostgreSQL's or libpq's message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    text = re.sub(r"^(connection failed: )", "", text)
    text = re.sub(r"\s+", " ", text)
    secret = _secret(url)
    if secret:
        text = text.replace(secret, "***")
    return text


def connect(url: str, *, application: str) -> psycopg.Connection[Any]:
    """A connection to the catalogue (not autocommit: every batch is one transaction)."""
    shown = redact(url)
    try:
        import psycopg
    except ImportError:
        raise CatalogueError(
            "the fleet catalogue needs psycopg 3, which is not installed (pip install 'treewatch[fleet]')"
        ) from None
    try:
        from psycopg.conninfo import make_conninfo

        conninfo = make_conninfo(url, connect_timeout=CONNECT_TIMEOUT_S, application_name=application, **KEEPALIVES)
        return psycopg.connect(conninfo)
    except psycopg.ProgrammingError as e:
        raise CatalogueError(f"catalogue {shown}: not a PostgreSQL URL or conninfo string: {reason(e, url)}") from None
    except psycopg.Error as e:
        raise CatalogueError(f"catalogue {shown}: cannot connect: {reason(e, url)}") from None


def version(conn: psycopg.Connection[Any]) -> int:
    """The catalogue's schema version; 0 when the database holds none yet."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('treewatch.meta') IS NOT NULL")
        row = cur.fetchone()
        if row is None or not row[0]:
            return 0
        cur.execute("SELECT version FROM treewatch.meta")
        row = cur.fetchone()
        return int(row[0]) if row is not None else 0


def _newer(found: int) -> str:
    return f"made by a newer treewatch (catalogue schema {found} > {CATALOGUE_VERSION}): upgrade treewatch on this box"


def migrate(conn: psycopg.Connection[Any], url: str) -> None:
    """Create the catalogue's schema, or bring it up to this version; refuse a newer one."""
    import psycopg

    try:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            found = version(conn)
            if found > CATALOGUE_VERSION:
                raise CatalogueError(f"catalogue {redact(url)}: {_newer(found)}")
            for target in sorted(n for n in MIGRATIONS if n > found):
                cur.execute(MIGRATIONS[target].encode())
                cur.execute("UPDATE treewatch.meta SET version = %s", (target,))
    except psycopg.Error as e:
        raise CatalogueError(
            f"catalogue {redact(url)}: cannot create or upgrade its schema: {reason(e, url)}"
        ) from None


def check(conn: psycopg.Connection[Any], url: str) -> None:
    """For reading only: the catalogue exists and is of this version (a reader does not migrate)."""
    import psycopg

    try:
        found = version(conn)
        conn.rollback()
    except psycopg.Error as e:
        raise CatalogueError(f"catalogue {redact(url)}: cannot be read: {reason(e, url)}") from None
    if found == 0:
        raise CatalogueError(
            f"catalogue {redact(url)}: holds no treewatch catalogue yet (`treewatch replicate --to URL` creates it)"
        )
    if found > CATALOGUE_VERSION:
        raise CatalogueError(f"catalogue {redact(url)}: {_newer(found)}")
    if found < CATALOGUE_VERSION:
        raise CatalogueError(
            f"catalogue {redact(url)}: schema {found} is older than this treewatch's {CATALOGUE_VERSION}"
            " (a `treewatch replicate` of this version upgrades it)"
        )
