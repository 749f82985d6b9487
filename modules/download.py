"""Downloads that survive bad networks and never leave a broken file behind.

Bytes go to `<file>.part`; only when all of them have arrived is it renamed to `<file>`, so a file
under its real name is always complete and is never fetched again. Where the folder cannot be written,
the file goes to the user's cache folder (modules/caches.py). An interrupted download (a cut
connection, Ctrl-C, a crash) resumes where it stopped: the next request asks the server only for the
missing bytes (HTTP Range). Transient failures (timeouts, resets, 5xx) are retried with exponential
backoff; anything else ends with one message naming the URL and how to do without the network.
"""
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .caches import cache_paths, write_cache
from .errors import UserError
from .files import write_error

CHUNK_BYTES = 1 << 20
RETRYABLE_HTTP_CODES = {408, 425, 429, 500, 502, 503, 504}
DOWNLOAD_ELSEWHERE = "another --data-dir or --models-dir; a rerun resumes the download"
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


class IncompleteDownload(ConnectionError):
    """The server closed the connection before sending every byte it announced."""


def download_file(url, path, expected_size=None, hint=None, retries=3, backoff_seconds=1.0, timeout=30.0,
                  progress=True):
    """Download `url` to `path` (skipped when it is already there, complete) and return where it is: `path`,
    or, where the operating system refuses to write it, the same path in the user's cache folder
    (modules/caches.py; one line says so).

    expected_size: the size in bytes the file must have; a file of another size is refused.
    hint: what the user can do without the network, for the error message (e.g. "pass --data PATH").
    retries, backoff_seconds: a transient failure is retried after 1x, 2x, 4x ... backoff_seconds;
        a retry that received bytes resets the count, so a slow, flaky link still finishes.
    """
    path = Path(path)
    for location in cache_paths(path):
        if location.is_file() and (expected_size is None or location.stat().st_size == expected_size):
            if progress:
                print(f"{location} is already complete")
            return location
    hint = hint or f"Without network access, download it on another machine and put it at {path}."
    return write_cache(path, lambda location: _download(url, location, expected_size, hint, retries, backoff_seconds,
                                                        timeout, progress),
                       f"{path.name}, downloaded from {url},", required=True)


def _download(url, path, expected_size, hint, retries, backoff_seconds, timeout, progress):
    """Download `url` to `path` through `<path>.part`, resuming it; raises WriteRefused for the disk."""
    part = path.with_name(path.name + ".part")
    failures = 0
    while True:
        received_before = _size(part)
        try:
            part.parent.mkdir(parents=True, exist_ok=True)
            _fetch_rest(url, part, expected_size, timeout, progress, path.name)
            break
        except urllib.error.HTTPError as error:
            if error.code not in RETRYABLE_HTTP_CODES:
                raise UserError(f"could not download {url}: HTTP {error.code} {error.reason}. {hint}") from None
            reason = f"HTTP {error.code} {error.reason}"
        except NETWORK_ERRORS as error:
            reason = str(getattr(error, "reason", None) or error) or type(error).__name__
        except OSError as error:  # not the network: the disk (full, read-only, ...); a rerun resumes the .part
            raise write_error(part, error, DOWNLOAD_ELSEWHERE) from None
        failures = 1 if _size(part) > received_before else failures + 1
        if failures > retries:
            raise UserError(f"could not download {url} ({reason}). {hint}")
        delay = backoff_seconds * 2 ** (failures - 1)
        tqdm.write(f"{url}: {reason}; retrying in {delay:g} s")
        time.sleep(delay)
    try:
        os.replace(part, path)
    except OSError as error:
        raise write_error(path, error, DOWNLOAD_ELSEWHERE) from None


def add_download_args(parser, data_help, url, what):
    """The data flags of a script whose data set comes from the internet unless given: --data (a local
    file), else a download from --data-url into --data-dir. Returns the argument group for more flags."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", type=Path, default=None, help=data_help)
    group.add_argument("--data-dir", type=Path, default=Path("data"),
                       help=f"where {what} is kept once downloaded (default: %(default)s)")
    group.add_argument("--data-url", default=url, help=f"where {what} is downloaded from (default: %(default)s)")
    return group


def _size(path):
    return path.stat().st_size if path.exists() else 0


def _fetch_rest(url, part, expected_size, timeout, progress, label):
    """Append to `part` the bytes of `url` it lacks; raise IncompleteDownload if the stream ends early."""
    offset = _size(part)
    headers = {"User-Agent": "gpt2-from-scratch"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code != 416 or not offset:
            raise
        # "Range not satisfiable": the part already holds every byte (or is longer than the file).
        total = _total_size(error.headers.get("Content-Range"))
        _check_size(url, total, expected_size, part)
        if total != offset:
            part.unlink()
            raise IncompleteDownload(f"{part} did not match the file on the server; starting over") from None
        return
    with response:
        if response.status == 206:
            if _range_start(response.headers.get("Content-Range")) != offset:
                part.unlink()
                raise IncompleteDownload("the server sent another range than the one asked for; starting over")
            total = _total_size(response.headers.get("Content-Range"))
        else:  # the server ignored the Range request and sends the whole file
            offset = 0
            total = int(response.headers["Content-Length"]) if response.headers.get("Content-Length") else None
        _check_size(url, total, expected_size, part)
        with open(part, "ab" if offset else "wb") as file, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
            disable=not progress,
        ) as bar:
            while chunk := response.read(CHUNK_BYTES):
                file.write(chunk)
                bar.update(len(chunk))
    received = _size(part)
    if total is not None and received < total:
        raise IncompleteDownload(f"connection closed after {received} of {total} bytes")
    _check_size(url, received, expected_size, part)


def _check_size(url, size, expected_size, part):
    """Refuse a file whose size differs from the one expected (a different or corrupted file)."""
    if size is not None and expected_size is not None and size != expected_size:
        part.unlink(missing_ok=True)
        raise UserError(f"{url} is {size} bytes, but {expected_size} were expected; the file on the server "
                        "is not the one this program knows, so it was not kept")


def _range_start(content_range):
    """First byte of a Content-Range header "bytes 100-199/200" (None if absent)."""
    match = re.match(r"bytes (\d+)-", content_range or "")
    return int(match.group(1)) if match else None


def _total_size(content_range):
    """Total size from "bytes 100-199/200" or "bytes */200" (None if unknown)."""
    match = re.search(r"/(\d+)\s*$", content_range or "")
    return int(match.group(1)) if match else None
