"""The one download helper: streamed, resumable, and checked before a file counts as downloaded.

A download goes to `dest + '.part'` and is renamed to `dest` only after its size and contents check out, so an
interrupted or corrupt transfer is never left looking like a finished file. A rerun resumes the `.part` with an
HTTP Range request; a `dest` that already passes the checks is not fetched again.
"""
import os
import re
import sys
import time

import requests
from tqdm import tqdm

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
RETRIES = 5


class DownloadError(RuntimeError):
    pass


class IncompleteDownload(DownloadError):
    pass


class Unreachable(DownloadError):
    """The server could not be reached at all (no network, unknown host, refused): retrying will not help."""


RETRYABLE = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, IncompleteDownload)


def connection_problem(e):
    """A short reason for a failed connection, instead of urllib3's paragraph."""
    text = str(e)
    host = re.search(r"host='([^']+)'", text)
    where = f" {host.group(1)}" if host else ""
    if "resolve" in text or "Name or service not known" in text:
        return f"cannot resolve host{where} (offline?)"
    if "refused" in text:
        return f"connection refused by{where or ' the server'}"
    if "ProxyError" in text or "proxy" in text.lower():
        return "cannot reach the proxy (offline?)"
    return type(e).__name__


def download_file(url, dest, expected_size=None, validate=None, chunk_size=1 << 20, desc=None):
    """Fetch url into dest unless dest is already there and valid; returns dest.

    expected_size: bytes the file must have. validate(path): raises if the content is bad (wrong format, truncated).
    Both are checked on the `.part` before it is renamed to dest; a `.part` that fails is deleted.
    """
    dest = os.fspath(dest)
    if os.path.exists(dest):
        try:
            check(dest, expected_size, validate)
            return dest
        except Exception as e:
            print(f"{dest} is bad ({e}): fetching it again")
            os.remove(dest)
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    part = dest + ".part"
    for attempt in range(RETRIES):
        try:
            fetch(url, part, chunk_size, desc or os.path.basename(dest))
            break
        except Unreachable as e:
            resume = f"; rerun to resume {part}" if os.path.exists(part) else ""
            raise DownloadError(f"could not download {url}: {e}. Without a network, put the file at {dest} by hand"
                                f"{resume}") from e
        except RETRYABLE as e:
            if attempt + 1 == RETRIES:
                raise DownloadError(f"{url}: gave up after {RETRIES} attempts ({e}); rerun to resume {part}") from e
            print(f"{url}: {e}; resuming (attempt {attempt + 2} of {RETRIES})")
            time.sleep(attempt)  # the first retry is immediate, later ones back off a little
    try:
        check(part, expected_size, validate)
    except Exception as e:
        os.remove(part)  # complete but wrong: resuming it could never fix it
        raise DownloadError(f"{url}: the downloaded file is bad and was deleted: {e}") from e
    os.replace(part, dest)
    return dest


def check(path, expected_size, validate):
    """Raise unless path has expected_size bytes (when given) and passes validate (when given)."""
    size = os.path.getsize(path)
    if expected_size is not None and size != expected_size:
        raise DownloadError(f"{path} has {size:,} bytes, expected {expected_size:,}")
    if validate is not None:
        validate(path)


def fetch(url, part, chunk_size, desc):
    """Append the rest of url to part (starting it afresh if the server ignores Range); raise if it ends short."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    try:
        response = requests.get(url, headers={"Range": f"bytes={have}-"} if have else None, stream=True, timeout=60)
    except requests.ConnectionError as e:  # no response at all; a connection lost mid-transfer is retried
        raise Unreachable(connection_problem(e)) from e
    with response as r:
        if r.status_code == 416:  # nothing past `have`: the part is either complete or longer than the file
            total = r.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) == have:
                return
            os.remove(part)
            return fetch(url, part, chunk_size, desc)
        r.raise_for_status()
        if r.status_code != 206:
            have = 0  # a plain 200: the server ignored the Range and sends the whole file
        total = have + int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
        with open(part, "ab" if have else "wb") as f, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=desc) as bar:
            for chunk in r.iter_content(chunk_size):
                bar.update(f.write(chunk))
    size = os.path.getsize(part)
    if total is not None and size != total:  # urllib3 2 raises on a short body itself; older versions do not
        raise IncompleteDownload(f"stopped at {size:,} of {total:,} bytes")


def run_main(main):
    """Run a prepare script's main(); a failed download ends with its message in one line, not a traceback."""
    try:
        main()
    except DownloadError as e:
        sys.exit(f"error: {e}")
