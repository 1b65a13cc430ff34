"""The one reader of users' text files (prompts, datasets, preference pairs): UTF-8, or an error naming the file.

Python's own ``UnicodeDecodeError`` names neither the file nor the line, and reading a file lazily raises it
wherever the bad byte happens to be, sometimes after minutes of work. Reading the whole file first, here, turns a
file in another encoding into one message with the file, the line and the fix, before anything else is done.
"""

from __future__ import annotations

import os
from pathlib import Path


def read_text_file(path: str | os.PathLike, what: str = "the file") -> str:
    """
    The text of a UTF-8 file (a leading byte-order mark is dropped, as spreadsheet programs write one).

    :param path: the file
    :param what: what the file is, for the message (e.g. ``"the prompt file"``)
    :return: the file's text; ``\\r\\n`` line ends are kept (CSV readers need them as written)
    :raises ValueError: the file is not UTF-8 text (the message gives the line and byte, and how to convert it)
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path}: {what} must be UTF-8 text, but byte {data[error.start]:#04x} on line {line} (offset "
            f"{error.start}) is not UTF-8; save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path.name} > "
            f"{path.stem}.utf8{path.suffix}) and pass that file"
        ) from None


def jsonl_lines(text: str) -> list[str]:
    """
    The lines of a JSON Lines text, split on ``\\n`` only (``str.splitlines`` also splits on U+2028 and other
    separators that JSON strings may hold as they are).

    :param text: the file's text
    :return: its lines, ``\\r`` stripped; line ``i`` of the file is ``lines[i - 1]``
    """
    return [line.rstrip("\r") for line in text.split("\n")]
