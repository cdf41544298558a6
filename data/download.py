"""The one download helper: streamed, resumable, and checked before a file counts as downloaded.

A download goes to `dest + '.part'` and is renamed to `dest` only after its size and contents check out, so an
interrupted or corrupt transfer is never left looking like a finished file. A rerun resumes the `.part` with an
HTTP Range request; a `dest` that already passes the checks is not fetched again.
"""
import os
import time

import requests
from tqdm import tqdm

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
RETRIES = 5


class DownloadError(RuntimeError):
    pass


class IncompleteDownload(DownloadError):
    pass


RETRYABLE = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, IncompleteDownload)


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
    with requests.get(url, headers={"Range": f"bytes={have}-"} if have else None, stream=True, timeout=60) as r:
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
