"""Which lines of ``flwr run --stream`` the console shows: Flower's and the libraries' noise is left out.

The log file keeps every line; only the echo to the console is filtered. Colour codes (Flower's
log levels, Ray's actor names) reach the console only when it is a terminal; never the log file.
"""

from __future__ import annotations

import os
import re
import sys
from typing import TextIO

from fedapp.ops.verdict import ANSI_CODE

# Lines of ``flwr run --stream`` that tell a user of this launcher nothing. They are not echoed to
# the console; the log file keeps every line. Matched on the line without its ANSI colours.
CONSOLE_NOISE: tuple[re.Pattern[str], ...] = (
    # Printed by every simulation since flwr 1.32; the launcher always sets num-supernodes itself.
    re.compile(r"^WARNING\s*:\s*Since flwr \S+, default simulated SuperNodes changed"),
    # Flower's hint to resize with `flwr federation simulation-config` (two lines): with this
    # launcher the size is --federation-config, and the line before says what it is.
    re.compile(r"^INFO\s*:\s*To change federation size, use the following command:"),
    re.compile(r"^INFO\s*:\s*flwr federation simulation-config "),
    # An empty Flower log line (the stream ends with one).
    re.compile(r"^(INFO|WARNING)\s*:\s*$"),
    # Flower's warning as Ray's actors are shut down at the end of every simulation, failed or not.
    re.compile(r"^(\(\w+ pid=\d+\)\s*)?WARNING\s*:\s*Manually terminating ClientAppActor\s*$"),
)
# A Python warning raised inside Ray or Flower (Ray's FutureWarning about accelerator variables on
# every run): about the libraries' own future defaults, nothing a user of this app can act on. A
# Ray actor's output carries the actor's name first.
LIBRARY_WARNING = re.compile(
    r"^(\(\w+ pid=\d+\)\s*)?\S*/(ray|flwr)/\S+\.py:\d+: (Future|Deprecation|PendingDeprecation)Warning: "
)
# Python prints a warning's source line after it, indented by two spaces ("  warnings.warn(").
WARNING_CONTINUATION = re.compile(r"^(\(\w+ pid=\d+\)\s*)?  \S")


def wants_colour(stream: TextIO = sys.stdout) -> bool:
    """Colours for a terminal only, and not where NO_COLOR is set (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def without_colour(line: str) -> str:
    return ANSI_CODE.sub("", line)


class ConsoleFilter:
    """Decides, line by line, which lines of the stream the console shows (see CONSOLE_NOISE), and
    how: with their colour codes only when ``colour`` (a terminal)."""

    def __init__(self, colour: bool = False) -> None:
        self.colour = colour
        self._in_warning = False  # the last line shown or not was a filtered library warning

    def render(self, line: str) -> str:
        """The line as the console prints it."""
        return line if self.colour else without_colour(line)

    def shows(self, line: str) -> bool:
        """Whether the console shows ``line`` (a filtered warning's source line is left out too)."""
        text = ANSI_CODE.sub("", line).rstrip("\r\n")
        if self._in_warning and WARNING_CONTINUATION.match(text):
            return False
        self._in_warning = bool(LIBRARY_WARNING.match(text))
        return not self._in_warning and not any(pattern.match(text) for pattern in CONSOLE_NOISE)
