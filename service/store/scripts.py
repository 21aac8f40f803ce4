"""The store's Lua scripts, each read from its own ``.lua`` file beside this module.

A script file names the helper files it needs in its ``-- uses:`` line; they are put before
it, in that order, each whole (no text of Python's is stitched in: the store's settings are
arguments, ``common.lua``'s ARGV[1..8]). The text sent to Redis is therefore one script per
file, content-addressed by its SHA: two versions of the service on one Redis (a rolling
deploy) run each its own scripts side by side.

Redis names a line of the text it ran, ``user_script:N``, which is in no file; each script
keeps a line map of what it assembled, and a ``ResponseError`` from it names the file and
line instead (``service/store/save.lua:57``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

from redis.commands.core import Script as RedisScript
from redis.exceptions import ResponseError

USES = re.compile(r"^-- uses: (.+)$", re.MULTILINE)
REDIS_LINE = re.compile(r"user_script:(\d+)")
HOME = "service/store"  # where the files are, as an error names them


@dataclass(frozen=True)
class Source:
    """A script's text as sent to Redis, and where each of its lines comes from."""

    name: str
    text: str
    lines: tuple[tuple[str, int], ...]  # line n of ``text`` is lines[n - 1]: (file, its line)

    def where(self, line: int) -> str:
        """``service/store/<file>.lua:<line>`` for line ``line`` of the text Redis ran."""
        if not 0 < line <= len(self.lines):
            return f"{HOME}/{self.name} (line {line} of the text Redis ran)"
        name, number = self.lines[line - 1]
        return f"{HOME}/{name}:{number}"

    def explain(self, error: ResponseError) -> ResponseError:
        """``error`` (of the same class) with each ``user_script:N`` replaced by its file and line."""
        return type(error)(REDIS_LINE.sub(lambda found: self.where(int(found[1])), str(error)))


@cache
def source(name: str) -> Source:
    """The script ``name`` (``open.lua``) with the helpers its ``-- uses:`` line names."""
    own = _read(name)
    uses = USES.search(own)
    parts = [*(uses[1].split() if uses else ()), name]
    texts, lines = [], []
    for part in parts:
        text = own if part == name else _read(part)  # a helper names no helpers of its own
        count = text.count("\n") + (not text.endswith("\n"))
        texts.append(text if text.endswith("\n") else text + "\n")
        lines += [(part, n) for n in range(1, count + 1)]
    return Source(name, "".join(texts), tuple(lines))


def _read(name: str) -> str:
    return files(__package__).joinpath(name).read_text(encoding="utf-8")


class Script:
    """One script as a client runs it: redis-py's ``Script`` (its SHA; loaded again where
    Redis lost it; queued in pipelines) and its source, to explain Redis' errors."""

    def __init__(self, client: Any, name: str):
        self.source = source(name)
        self.redis: RedisScript = client.register_script(self.source.text)

    @property
    def sha(self) -> str:
        return self.redis.sha

    def __call__(self, keys: list, args: list, client: Any = None) -> Any:
        try:
            return self.redis(keys=keys, args=args, client=client)
        except ResponseError as error:
            raise self.source.explain(error) from error
