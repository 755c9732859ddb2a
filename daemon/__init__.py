"""treewatch: keeps a library index (SQLite) true to a directory tree."""

__version__ = "0.1.0"
