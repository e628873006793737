"""The bounds of every input, checked before any work on it: a recipe or `--set` value (size, nesting, alias
expansion), a dataset's index files and captions, a prompts file, a request body (size by --max-request-bytes in
serving/openai_api.py; nesting here). Each refusal is one line naming the input and the limit (`LimitExceeded`, bad
input: exit 2, HTTP 400 or 413). README.md's "Failure behaviour" lists them.
"""
from __future__ import annotations

import re
from typing import BinaryIO, Iterator

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few KB
MAX_OVERRIDE_CHARS = 1 << 16  # one `--set KEY=VALUE`
MAX_NESTING = 32  # mappings and lists inside each other: a recipe is 4 deep, a request body 3
MAX_YAML_NODES = 100_000  # values of a YAML document once its aliases are expanded
MAX_TEXT_CHARS = 4096  # one caption or prompt (the text encoders read the first 77 tokens)
MAX_LINE_BYTES = 1 << 16  # one line of captions.jsonl or a prompts file
MAX_PROMPT_FILE_BYTES = 16 << 20
MAX_INDEX_BYTES = 1 << 30  # a COCO captions JSON (COCO 2017 train: 92 MB)
MAX_SHARD_MEMBER_BYTES = 256 << 20  # one file inside a .tar shard


class LimitExceeded(ValueError):
    """An input is larger or deeper than its limit; the message names the input and the limit."""


def check_size(size: int, limit: int, where: str, unit: str = "bytes", how: str = "") -> None:
    if size > limit:
        raise LimitExceeded(f"{where}: {size} {unit}, more than the limit of {limit}{how}")


def check_text(text: str, where: str) -> str:
    """A caption or prompt of at most MAX_TEXT_CHARS characters."""
    check_size(len(text), MAX_TEXT_CHARS, where, "characters")
    return text


def check_yaml(text: str, where: str, max_chars: int = MAX_RECIPE_BYTES) -> None:
    """YAML within bounds before it is built into objects (PyYAML's composer and constructor recurse per nesting
    level, and an alias is a reference that every later walk expands): size, nesting, expanded values. The parser's
    events are read iteratively; a syntax error is left to the loader's own message."""
    import yaml

    check_size(len(text), max_chars, where, "characters")
    depth, expanded, sizes, starts = 0, 0, {}, []
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                check_size(depth, MAX_NESTING, where, "levels of nesting")
                starts.append((event.anchor, expanded))
                expanded += 1
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
                anchor, start = starts.pop()
                if anchor:
                    sizes[anchor] = expanded - start
            elif isinstance(event, yaml.ScalarEvent):
                expanded += 1
                if event.anchor:
                    sizes[event.anchor] = 1
            elif isinstance(event, yaml.AliasEvent):
                expanded += sizes.get(event.anchor, 1)
            check_size(expanded, MAX_YAML_NODES, where, "values", " (with its aliases expanded)")
    except yaml.YAMLError:
        return  # not YAML: the loader says where


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(rb"[\[\]{}]")


def check_json_nesting(body: bytes | str, where: str) -> None:
    """JSON nested at most MAX_NESTING deep (json.loads recurses per level)."""
    data = body.encode("utf-8", "replace") if isinstance(body, str) else bytes(body)
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub(b'""', data)):
        depth += 1 if match.group() in (b"[", b"{") else -1
        check_size(depth, MAX_NESTING, where, "levels of nesting")


def bounded_lines(stream: BinaryIO, where: str, max_line: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a binary stream read in chunks (any file object: fsspec's readline takes no limit),
    never holding more than one line of at most `max_line` bytes plus one chunk."""
    def checked(line: bytes, lineno: int) -> tuple[int, bytes]:
        if len(line) > max_line:
            raise LimitExceeded(f"{where}:{lineno}: a line longer than the limit of {max_line} bytes")
        return lineno, line.rstrip(b"\r")

    lineno, pending = 0, b""
    while True:
        chunk = stream.read(max_line)
        *lines, pending = (pending + chunk).split(b"\n")  # pending: the unfinished last line
        for line in lines:
            lineno += 1
            yield checked(line, lineno)
        checked(pending, lineno + 1)
        if not chunk:
            if pending:
                yield checked(pending, lineno + 1)
            return
