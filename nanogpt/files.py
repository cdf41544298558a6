"""Reading and writing the repo's small files, one way everywhere.

Writes go to a temp file beside the target and are renamed over it (atomic on POSIX): a reader, or a crash, never
sees half a file. Reads of JSON and JSON-lines name the file (and the line) in their one-line errors, and a JSON-lines
file whose last line was cut by a crash keeps every complete line before it.
"""
import contextlib
import gzip
import json
import os
import tempfile


class FileFormatError(ValueError):
    """A file this repo reads holds something else: the message names the file (and line) and what is wrong."""


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside `path` to write to; on success it is renamed over `path`, on failure removed."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path, data):
    """Write a str or bytes to path through a temp file and a rename."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            with open(tmp, "wb") as f:
                f.write(data)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(data)


def write_json(path, obj, indent=1):
    write_atomic(path, json.dumps(obj, indent=indent) + "\n")


def check_writable(folder, names=()):
    """Raise OSError naming the problem unless a file can be created in `folder` and each of `names` there is a
    file or absent (a command checks this before its work, not after)."""
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"{folder} is not a folder to write in")
    for name in names:
        path = os.path.join(folder, name)
        if os.path.exists(path) and not os.path.isfile(path):
            raise IsADirectoryError(f"{path} is not a file: cannot write it")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise PermissionError(f"cannot write in {folder} ({e.strerror})") from None


def read_text(path):
    """A UTF-8 text file; a missing file or invalid UTF-8 is a FileFormatError / FileNotFoundError naming it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise FileFormatError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None


def read_json(path):
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def read_jsonl(path, tolerate_cut_tail=False):
    """The rows of a JSON-lines file. tolerate_cut_tail: a last line without its newline that does not parse (a
    writer killed mid-line) is dropped with a warning instead of an error; every earlier line must parse."""
    text = read_text(path)
    lines = text.split("\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if tolerate_cut_tail and n == len(lines):  # the last line, not newline-terminated
                print(f"warning: {path}:{n}: dropped a cut last line (a crash mid-write); earlier rows kept")
                break
            raise FileFormatError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def numbered_jsonl(path):
    """(line number, object) for each non-blank line of a JSONL file, gzipped or not, streamed (read_jsonl reads a
    whole small file); bad JSON or UTF-8 is a FileFormatError naming file:line."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    number = 0
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            for number, raw in enumerate(f, 1):
                line = raw.decode("utf-8")
                if line.strip():
                    try:
                        yield number, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise FileFormatError(f"{path}:{number}: not a JSON object ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path}:{number}: not valid UTF-8 (byte {e.start} of the line)") from None
    except (OSError, EOFError) as e:  # a truncated gzip
        raise FileFormatError(f"{path}: not readable as {'gzipped ' if gzipped else ''}JSON lines ({e})") from None
