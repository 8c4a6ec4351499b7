"""Where things are in a TOML text, and its syntax errors in plain words.

``tomllib`` (under ``msgspec.toml``) decodes a file into plain values and forgets where each
came from, and its syntax errors are worded for its own parser: an unterminated string reads
"Illegal character '\\n'", or "Expected \"'\" (at end of document)" far below the line at
fault. ``TomlLines`` reads the text once more, line by line, and remembers the line of every
``[table]`` / ``[[array]]`` header and of every ``key =``, so that ``config check`` can say
``file:line`` for a field the decoder or the schema refused; ``syntax_problem`` turns a decode
error into a line and a message an operator can act on.

This is a locator, not a second parser: it never decides whether the text is valid (tomllib
does), so on text it cannot follow it answers a less precise line (the table's header), never
a wrong verdict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# A table's place in the decoded document: ("models", 1, "profiles", 0) for the first
# [[models.profiles]] of the second [[models]].
TablePath = tuple[str | int, ...]

_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_KEY = re.compile(rf"\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*=")
_HEADER = re.compile(rf"\s*(\[\[?)\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*\]\]?")
_POSITION = re.compile(r" \((?:at line (\d+), column \d+|at end of document)\)$")

# tomllib's messages, reworded (prefix match). The unterminated-string ones are found by the
# line scan instead, which knows the line where the string opened.
_PLAIN = {
    "Unclosed array": "unclosed array: a ']' is missing",
    "Unclosed inline table": "unclosed inline table: a '}' is missing (an inline table stays on one line)",
    "Invalid value": "missing or invalid value after '=' (text needs quotes: \"like this\")",
    "Expected '=' after a key": "expected 'key = value' (text of several words needs quotes)",
    "Cannot overwrite a value": "a key is set twice",
    "Cannot declare": "a table or key is declared twice",
    "Unescaped '\\' in a string": "a backslash in a \"...\" string must be doubled (\\\\), or use '...'",
    "Invalid statement": "not a TOML line: expected 'key = value', [table] or [[array]]",
    "Expected newline or end of document": "unexpected text after a value (one 'key = value' a line)",
    "Invalid initial character for a key part": "invalid key: use letters, digits, '_' and '-', or quote it",
    "Expected ']' at the end of a table declaration": "a table header must end with ']'",
    "Expected ']]' at the end of an array declaration": "an [[array]] header must end with ']]'",
}
_UNTERMINATED = ("Illegal character '\\n'", "Found invalid character '\\n'", "Unterminated string", "Expected \"'\"", "Expected '\"'",
                 "Expected '\"\"\"'", "Expected \"'''\"")
UNTERMINATED_STRING = "unterminated string: close it with the same quote on this line (\"\"\" ... \"\"\" spans lines)"


@dataclass
class TomlLines:
    """Line numbers (1-based) of the headers and keys of one TOML text."""

    keys: dict[tuple[TablePath, str], int] = field(default_factory=dict)  # first ``key =`` in a table
    tables: dict[TablePath, int] = field(default_factory=dict)  # header line of a table
    repeated: list[tuple[int, int, str]] = field(default_factory=list)  # (line, first line, dotted key)
    open_string: int | None = None  # the first line with a one-line string left open
    open_bracket: int | None = None  # the line of a [ or { still open at the end

    @classmethod
    def scan(cls, text: str) -> TomlLines:
        found = cls()
        _Scanner(found).feed(text)
        return found

    def line_of(self, table: TablePath, key: str, instead: str) -> int | None:
        """The line of ``key`` if written in ``table``, else of ``instead`` (a model's ``engine``,
        whose preset supplied the field), else as ``line``."""
        return self.keys.get((table, key)) or self.tables.get((*table, key)) or self.line(table, instead)

    def line(self, table: TablePath, key: str | None = None) -> int | None:
        """The line of ``key`` in ``table``; else the table's header; else the line of the key
        that holds the table (an inline table, an element of an inline array); None if none."""
        while True:
            if key is not None and (table, key) in self.keys:
                return self.keys[(table, key)]
            if key is not None and (*table, key) in self.tables:  # [models] where [[models]] was meant
                return self.tables[(*table, key)]
            if table in self.tables:
                return self.tables[table]
            if not table:
                return None
            cut = 2 if isinstance(table[-1], int) and len(table) >= 2 else 1
            key, table = str(table[-cut]), table[:-cut]


class _Scanner:
    """Follows headers, keys, strings and brackets line by line (see ``TomlLines``)."""

    def __init__(self, out: TomlLines) -> None:
        self.out = out
        self.table: TablePath = ()
        self.arrays: dict[TablePath, int] = {}  # an [[array]]'s path -> elements so far
        self.full_keys: dict[tuple[TablePath, tuple[str, ...]], int] = {}
        self.multiline: str | None = None  # the closing quote of an open multi-line string
        self.multiline_from = 0  # the line it opened on
        self.depth = 0  # open [ and { of a value that spans lines
        self.opened = 0  # the line of the outermost one

    def feed(self, text: str) -> None:
        for number, line in enumerate(text.splitlines(), 1):
            if self.multiline is None and self.depth == 0:
                self.statement(number, line)
            self.follow(number, line)
        if self.multiline:
            self.out.open_string = self.out.open_string or self.multiline_from
        if self.depth:
            self.out.open_bracket = self.opened

    def statement(self, number: int, line: str) -> None:
        if header := _HEADER.match(line):
            self.table = self.resolve(_parts(header.group(2)), header.group(1) == "[[")
            self.record(number, (), self.table)
            self.out.tables.setdefault(self.table, number)
        elif key := _KEY.match(line):
            parts = _parts(key.group(1))
            for depth in range(len(parts)):
                self.out.keys.setdefault((self.table + tuple(parts[:depth]), parts[depth]), number)
            self.record(number, self.table, tuple(parts))

    def record(self, number: int, table: TablePath, parts: tuple) -> None:
        first = self.full_keys.setdefault((table, parts), number)
        if first != number:
            self.out.repeated.append((number, first, ".".join(map(str, parts))))

    def resolve(self, parts: list[str], array: bool) -> TablePath:
        """The path of a header: an [[array]] on the way means its latest element."""
        path: TablePath = ()
        for n, part in enumerate(parts):
            path += (part,)
            last = n == len(parts) - 1
            if array and last:
                self.arrays[path] = self.arrays.get(path, 0) + 1
            if path in self.arrays:
                path += (self.arrays[path] - 1,)
        return path

    def follow(self, number: int, line: str) -> None:
        """Track strings and brackets to the end of ``line``."""
        i = 0
        while i < len(line):
            if self.multiline:
                end = line.find(self.multiline, i)
                if end < 0:
                    return
                i, self.multiline = end + 3, None
                continue
            c = line[i]
            if c == "#":
                return
            if line.startswith(('"""', "'''"), i):
                self.multiline, self.multiline_from, i = line[i:i + 3], number, i + 3
                continue
            if c in "\"'":
                j = i + 1
                while j < len(line) and line[j] != c:
                    j += 2 if c == '"' and line[j] == "\\" else 1
                if j >= len(line):
                    self.out.open_string = self.out.open_string or number
                    return
                i = j + 1
                continue
            if c in "[{":
                self.opened = number if self.depth == 0 else self.opened
                self.depth += 1
            elif c in "]}":
                self.depth = max(0, self.depth - 1)
            i += 1


def _parts(dotted: str) -> list[str]:
    """``a."b.c".d`` -> ["a", "b.c", "d"]."""
    return [p[1:-1] if p[:1] in "\"'" else p for p in re.findall(_KEY_PART, dotted)]


def syntax_problem(message: str, lines: TomlLines) -> tuple[int | None, str]:
    """(line, plain message) for a TOML decode error's ``message`` (tomllib's wording)."""
    position = _POSITION.search(message)
    bare = message[:position.start()] if position else message
    line = int(position.group(1)) if position and position.group(1) else None
    if bare.startswith(_UNTERMINATED):
        return lines.open_string or line, UNTERMINATED_STRING
    if bare.startswith(("Cannot overwrite a value", "Cannot declare")) and lines.repeated:
        again, first, key = lines.repeated[0]
        return again, f"{key!r} is set twice (first on line {first})"
    if bare.startswith(("Unclosed array", "Unclosed inline table")):
        line = lines.open_bracket or line
    for start, plain in _PLAIN.items():
        if bare.startswith(start):
            return line, plain
    return line, bare[:1].lower() + bare[1:]
