"""Reading the project's Markdown as GitHub renders it, for ``tests/test_docs.py``.

- ``anchors``: the ``#fragment`` each heading gets (GitHub's slugs: lower case, punctuation
  dropped, each space a ``-``, a repeated slug numbered ``-1``, ``-2`` …).
- ``links``: every link target outside code (inline ``[text](target)`` and reference
  definitions ``[id]: target``), with its line number.
- ``curl_examples``: every ``curl`` command of the ``bash``/``console`` code blocks, with the
  answer the document shows under it (``console`` blocks: the lines after ``$ curl …``), the
  status it announces (a ``# status NNN`` comment; 200 when none) and whether the block is
  marked ``<!-- not-run: reason -->`` (an example that cannot run against the demo verbatim).
"""

from __future__ import annotations

import re
import shlex
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.+?)\s*-->")
STATUS = re.compile(r"#\s*status\s+(\d{3})\b")
SHELL_LANGS = {"bash", "sh", "shell", "console"}


@dataclass
class Block:
    """One fenced code block: its language, first line number (1-based, the line after the
    fence), lines, and the ``not-run`` reason of an HTML comment just above it ("" if none)."""

    lang: str
    line: int
    lines: list[str]
    not_run: str = ""


def blocks_and_prose(text: str) -> tuple[list[Block], list[tuple[int, str]]]:
    """Split a document into its fenced code blocks and its other lines (numbered)."""
    blocks: list[Block] = []
    prose: list[tuple[int, str]] = []
    current: Block | None = None
    fence = ""
    pending_not_run = ""
    for number, line in enumerate(text.splitlines(), 1):
        opened = FENCE.match(line)
        if current is not None:
            if opened and opened.group(1) == fence and not opened.group(2):
                blocks.append(current)
                current = None
            else:
                current.lines.append(line)
            continue
        if opened:
            fence = opened.group(1)
            current = Block(opened.group(2).lower(), number + 1, [], pending_not_run)
            pending_not_run = ""
            continue
        prose.append((number, line))
        if marker := NOT_RUN.search(line):
            pending_not_run = marker.group(1)
        elif line.strip():
            pending_not_run = ""  # the marker belongs to the block right below it
    return blocks, prose


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (github-slugger): the rendered text, lower case,
    without anything but letters, digits, ``_``, ``-`` and spaces; each space a ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every ``#fragment`` the document defines: its headings' slugs and HTML anchors."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    _, prose = blocks_and_prose(text)
    for _, line in prose:
        found.update(HTML_ANCHOR.findall(line))
        if m := HEADING.match(line):
            base = slug(m.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str) -> list[tuple[int, str]]:
    """Every link target written outside code blocks and inline code, with its line number (a
    link's text may wrap onto the next line)."""
    _, prose = blocks_and_prose(text)
    out: list[tuple[int, str]] = []
    starts: list[int] = []  # offset in ``joined`` where each prose line starts
    offset = 0
    for _, line in prose:
        starts.append(offset)
        offset += len(line) + 1
    joined = "\n".join(line for _, line in prose)
    code = [m.span() for m in CODE_SPAN.finditer(joined)]
    for m in INLINE_LINK.finditer(joined):
        if not any(start <= m.start() < end for start, end in code):  # not inside `inline code`
            out.append((prose[bisect_right(starts, m.start()) - 1][0], m.group(1)))
    out += [(number, m.group(1)) for number, line in prose if (m := REFERENCE.match(line))]
    return sorted(out, key=lambda link: link[0])  # by line; in a line, as written


@dataclass
class CurlExample:
    """One ``curl`` command of a document and what the document says it answers."""

    doc: str
    line: int
    command: str  # as written, continuation lines joined
    argv: list[str]  # the curl command's words, before any pipe
    piped: bool  # the document pipes the output (``| grep …``): ``shown`` is filtered
    status: int  # announced by a ``# status NNN`` comment; 200 otherwise
    shown: list[str] = field(default_factory=list)  # the answer printed under it (console blocks)
    not_run: str = ""

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def _logical_lines(lines: list[str], first: int) -> list[tuple[int, str]]:
    """Join ``\\``-continued lines; each joined line with the number of its first line."""
    out: list[tuple[int, str]] = []
    buf = ""
    start = first
    for offset, line in enumerate(lines):
        if not buf:
            start = first + offset
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((start, buf + line))
        buf = ""
    if buf:
        out.append((start, buf))
    return out


def _split_command(command: str) -> tuple[list[str], bool]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words = list(lexer)
    if "|" in words:
        return words[:words.index("|")], True
    return words, False


def curl_examples(doc: str, text: str) -> list[CurlExample]:
    """Every curl command in the document's shell and console blocks, in order."""
    blocks, _ = blocks_and_prose(text)
    found: list[CurlExample] = []
    for block in blocks:
        if block.lang not in SHELL_LANGS:
            continue
        console = block.lang == "console"
        current: CurlExample | None = None
        for number, line in _logical_lines(block.lines, block.line):
            command = line.strip()
            if console:
                if not command.startswith("$ "):
                    if current is not None:
                        current.shown.append(line)
                    continue
                command = command[2:]
            current = None
            if not command.startswith("curl "):
                continue
            argv, piped = _split_command(command)
            status = STATUS.search(command)
            current = CurlExample(doc, number, command, argv, piped, int(status.group(1)) if status else 200,
                                  not_run=block.not_run)
            found.append(current)
    return found


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")
