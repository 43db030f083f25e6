"""Shards that are not local files: `pipe:COMMAND`, `http(s)://` URLs and `s3://` / `gs://` (fsspec).

A remote shard is copied ("spooled") into an anonymous temporary file on local disk, then indexed
and read like a local shard (emu_mc/data/shards.py): the samples, their shuffled order and a resume
position are the same as for the same tar on local disk. The file has no name (it is unlinked at
creation), so its disk space is freed when the last reader drops it, even after kill -9.

A copy that fails (connection refused or dropped, HTTP error, non-zero exit of the pipe command, a
short body) or stalls (no byte for `timeout_s`) is retried `retries` times with exponential backoff,
then given up: the caller counts the shard as bad under the reason given here. Credentials are
whatever the pipe command or fsspec uses (environment, ~/.aws, gcloud auth); emu_mc stores none, and
logs and messages name a shard by `redact(spec)`: a presigned URL's signature, a password in a URL or a
bearer token in a pipe command never reaches a log.
"""
import importlib.util
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import BinaryIO, Callable, Optional, Tuple

# fsspec schemes -> the package that implements them (an optional extra of emu_mc)
FSSPEC_EXTRAS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
HAVE_EXTRA = {pkg: importlib.util.find_spec(pkg) is not None for pkg in set(FSSPEC_EXTRAS.values())}
_CHUNK = 1 << 20
_BACKOFF_S = 0.5  # first retry delay; doubles per retry, capped at _BACKOFF_MAX_S
_BACKOFF_MAX_S = 30.0

# Reasons a remote shard is given up on (loader.stats()["bad_shard_reasons"])
REMOTE_NOT_FOUND = "remote_not_found"  # HTTP 404 / no such object: not retried
REMOTE_FAILED = "remote_failed"  # connection refused or dropped, HTTP error, pipe command failed, short body
REMOTE_TIMEOUT = "remote_timeout"  # no byte received for data.remote_timeout_s


def scheme(spec: str) -> Optional[str]:
    """"pipe", "http", an fsspec scheme ("s3", "gs", ...) or None for a local path."""
    if spec.startswith("pipe:"):
        return "pipe"
    if spec.startswith(("http://", "https://")):
        return "http"
    head, sep, _ = spec.partition("://")
    if sep and head in FSSPEC_EXTRAS:
        return head
    return None


_URL_SECRETS = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/?#@\s'\"]*@)?"
                          r"(?P<path>[^?#\s'\"]*)(?P<query>\?[^#\s'\"]*)?")
_AUTH_HEADER = re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s'\"]+")


def redact(text: str) -> str:
    """`text` (a shard spec, a pipe command, an error message) as logs may show it: in every URL the
    user:password@ part becomes ***@ and each query value *** (presigned S3 / GCS / Azure SAS URLs
    carry their credentials there), and the credentials after Bearer / Basic (an Authorization header) ***."""
    def url(m: re.Match) -> str:
        query = m["query"] and re.sub(r"=[^&]*", "=***", m["query"])
        return m["scheme"] + ("***@" if m["userinfo"] else "") + m["path"] + (query or "")
    return _AUTH_HEADER.sub(lambda m: m[1] + m[2] + "***", _URL_SECRETS.sub(url, text))


def without_credentials(config: dict) -> dict:
    """A copy of a config dict (config_to_dict, decoder_config_to_dict) with each data.sources[i].shards
    redacted: what a checkpoint records, so that its metadata holds no signature and a resume with
    freshly signed URLs of the same objects reads as the same data."""
    data = config.get("data") or {}
    sources = [dict(s, shards=redact(s["shards"])) for s in data.get("sources") or []]
    return dict(config, data=dict(data, sources=sources)) if sources else config


def is_remote(spec: str) -> bool:
    return scheme(spec) is not None


def missing_extra(spec: str) -> Optional[str]:
    """A message naming the package to install when `spec` needs an fsspec extra that is absent."""
    kind = scheme(spec)
    package = FSSPEC_EXTRAS.get(kind or "")
    if package is None or (HAVE_EXTRA[package] and importlib.util.find_spec("fsspec") is not None):
        return None
    return f"{kind}:// shards are read through fsspec and need the {package} package: pip install fsspec {package}"


class RemoteError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RemoteOptions:
    """How remote shards are fetched (data.remote_retries, data.remote_timeout_s, data.spool_dir)."""

    retries: int = 3
    timeout_s: float = 60.0  # a stream that sends nothing this long is given up (0 = never)
    spool_dir: str = ""  # where the local copies go ("" = the system temp dir, $TMPDIR)


@dataclass
class SpooledShard:
    """A remote shard's bytes in an unlinked local file; `read` is safe from many threads."""

    file: BinaryIO
    size: int

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.file.fileno(), size, offset)


def _open(spec: str, timeout_s: float) -> Tuple[BinaryIO, Callable[[], None], Callable[[int], None]]:
    """(byte stream, abort, finish(bytes read)): abort unblocks a stalled read; finish raises
    RemoteError when the stream ended early (pipe exit status, HTTP Content-Length)."""
    kind = scheme(spec)
    if kind == "pipe":
        stderr = tempfile.TemporaryFile()
        proc = subprocess.Popen(spec[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=stderr,
                                start_new_session=True)

        def finish_pipe(_: int) -> None:
            with stderr:
                if proc.wait() != 0:
                    stderr.seek(0)
                    last = redact(stderr.read().decode("utf-8", "replace")).strip().splitlines()[-1:]
                    raise RemoteError(REMOTE_FAILED, f"the pipe command exited with status {proc.returncode}"
                                                     + "".join(f": {line}" for line in last))

        def kill() -> None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # exited already
                pass
        return proc.stdout, kill, finish_pipe
    if kind == "http":
        try:
            response = urllib.request.urlopen(spec, timeout=timeout_s or None)
        except urllib.error.HTTPError as e:
            reason = REMOTE_NOT_FOUND if e.code in (403, 404, 410) else REMOTE_FAILED
            raise RemoteError(reason, f"HTTP {e.code} {e.reason}") from None
        length = response.headers.get("Content-Length")

        def finish_http(n: int) -> None:
            if length is not None and n != int(length):
                raise RemoteError(REMOTE_FAILED, f"the connection closed after {n} of {length} bytes")
        return response, response.close, finish_http
    import fsspec

    try:
        stream = fsspec.open(spec, "rb").open()
    except FileNotFoundError as e:
        raise RemoteError(REMOTE_NOT_FOUND, f"no such object: {e}") from None
    return stream, stream.close, lambda n: None


def _copy_once(spec: str, timeout_s: float, spool_dir: str) -> SpooledShard:
    """One attempt: the whole stream into a new unlinked file, or RemoteError. The reading runs on a
    daemon thread watched for progress, so a stream that stops sending times out whatever blocks it."""
    out = tempfile.TemporaryFile(dir=spool_dir or None)
    progress = {"bytes": 0, "at": time.monotonic(), "error": None, "done": False}

    def stalled() -> str:
        return f"no data for data.remote_timeout_s = {timeout_s:g} s (after {progress['bytes']} bytes)"

    def copy() -> None:
        try:
            stream, abort, finish = _open(spec, timeout_s)
            progress["abort"] = abort
            with stream:
                read = getattr(stream, "read1", stream.read)  # what has arrived, not a full chunk
                while True:
                    chunk = read(_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    progress["bytes"] += len(chunk)
                    progress["at"] = time.monotonic()
            finish(progress["bytes"])
        except RemoteError as e:
            progress["error"] = e
        except TimeoutError:  # the socket's own timeout (http)
            progress["error"] = RemoteError(REMOTE_TIMEOUT, stalled())
        except Exception as e:  # socket errors, IncompleteRead, fsspec backends' own errors
            progress["error"] = RemoteError(REMOTE_FAILED, f"{type(e).__name__}: {e}")
        progress["done"] = True

    thread = threading.Thread(target=copy, name="emu-shard-fetch", daemon=True)
    thread.start()
    while not progress["done"]:
        thread.join(0.05)
        if timeout_s and not progress["done"] and time.monotonic() - progress["at"] > timeout_s:
            progress.get("abort", lambda: None)()
            out.close()
            raise RemoteError(REMOTE_TIMEOUT, stalled())
    if progress["error"] is not None:
        out.close()
        raise progress["error"]
    out.flush()
    return SpooledShard(out, progress["bytes"])


def spool(spec: str, options: RemoteOptions, sleep: Callable[[float], None] = time.sleep) -> SpooledShard:
    """The remote shard `spec` copied to local disk, tried 1 + `options.retries` times with
    exponential backoff (not-found errors are not retried). Raises the last RemoteError, its message
    saying how many attempts were made."""
    attempt = 0
    while True:
        try:
            return _copy_once(spec, options.timeout_s, options.spool_dir)
        except RemoteError as e:
            if e.reason == REMOTE_NOT_FOUND or attempt >= options.retries:
                raise RemoteError(e.reason, f"{e} ({attempt + 1} attempt(s))") from None
        sleep(min(_BACKOFF_MAX_S, _BACKOFF_S * 2 ** attempt))
        attempt += 1
