"""Text files split into lines the way Caffe reads them.

Caffe reads its listings (convert_imageset.cpp, image_data_layer.cpp) and label files
(classification.cpp) with std::getline, which ends a line at '\n' and nowhere else. Python's
str.splitlines also ends one at '\r', '\v', '\f', '\x1c'-'\x1e', '\x85', U+2028 and U+2029, so a
file name holding one of those became two entries: one silently wrong record, or a refused
line. Every reader of a listing, label or checksum file here splits with `caffe_lines`.
"""
from __future__ import annotations

import os
from pathlib import Path

# What str.splitlines breaks at besides '\n': kept inside a line (and shown escaped in one-line
# messages: flows/cli.py).
OTHER_LINE_BREAKS = "\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"


def caffe_lines(text: str) -> list[str]:
    """`text` split at '\\n' only, as std::getline does; the newline ending the last line
    makes no empty line after it, and the '\\r' of a Windows line end is dropped (Caffe leaves
    it on the line, where atoi ignores it after a label)."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_text(path: str | os.PathLike, errors: str = "strict") -> str:
    """A UTF-8 file's text with every '\r' kept: Path.read_text translates '\r' and '\r\n'
    to '\n' (universal newlines), which would split a line where Caffe does not."""
    return Path(path).read_bytes().decode("utf-8", errors)


def read_caffe_lines(path: str | os.PathLike, errors: str = "strict") -> list[str]:
    """caffe_lines of a UTF-8 file."""
    return caffe_lines(read_text(path, errors))


__all__ = ["OTHER_LINE_BREAKS", "caffe_lines", "read_caffe_lines", "read_text"]
