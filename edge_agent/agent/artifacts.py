"""The artifact store: models and bank archives that desired documents name by URL (docs/fleet.md, step 2).

Layout under <state_dir>/artifacts:
  staging/<sha256>.part   a download, kept when it is interrupted and resumed with HTTP Range
  <sha256>.tmp-*/         an artifact being unpacked and self-tested (a crash leaves it; keep_only removes it)
  <sha256>/model.onnx     a stored model
  <sha256>/bank/          a stored bank: the archive's files, unpacked
An artifact enters the store by renaming its fsynced temporary directory to <sha256>, so a directory named by
a sha256 is always complete.

Downloads use urllib, which honours the http_proxy, https_proxy and no_proxy environment variables.
"""

from __future__ import annotations

import contextlib
import http.client
import lzma
import os
import re
import shutil
import socket
import ssl
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal
from urllib.parse import urlsplit

from edge_agent.errors import ConfigError, EdgeAsdError
from edge_agent.fsutil import fsync_path, sha256_file
from edge_agent.logs import get_logger

log = get_logger(__name__)

KINDS = ("model", "bank")
REF_KEYS = ("url", "sha256", "size", "version")
MODEL_FILE = "model.onnx"
BANK_DIR = "bank"
STAGING = "staging"
MAX_URL_CHARS = 2048
MAX_VERSION_CHARS = 128
MAX_MEMBERS = 10_000  # members of a bank archive
MAX_ATTEMPTS = 5  # transfers per fetch: an interrupted one is resumed up to this many times
RETRY_PAUSE = 0.1  # seconds before the first resume, doubled at each next one ...
MAX_RETRY_PAUSE = 2.0  # ... up to this
CHUNK = 64 * 1024
PROGRESS_STEP = 1.0  # percent between two "downloading" reports ...
PROGRESS_SECONDS = 0.5  # ... or seconds, whichever comes first
WATCH_SECONDS = 0.05  # how often a transfer looks at its cancel event and deadline
USER_AGENT = "edge-asd-agent"
_TMP = ".tmp-"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

Progress = Callable[[str, float | None], None]
SelfTest = Callable[[Path], None]


class ArtifactError(EdgeAsdError):
    """An artifact cannot be fetched, verified, unpacked or self-tested; the message names its URL (or file)."""


class _Interrupted(ArtifactError):
    """The transfer stopped early: the .part is kept and the next attempt resumes it."""


def url_problem(url: str) -> str | None:
    """What makes `url` unfit as an artifact URL (said of the URL: "is ..."), or None."""
    if len(url) > MAX_URL_CHARS:
        return f"is longer than {MAX_URL_CHARS} characters"
    if not url.isascii():
        return "is not ASCII (percent-encode other characters)"
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        return "contains spaces or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "is not an http or https URL"
    if "@" in parts.netloc:
        return "contains credentials (user:password@): give a URL that needs none"
    if not parts.hostname:
        return "has no host"
    return None


@dataclass(frozen=True)
class ArtifactRef:
    kind: Literal["model", "bank"]
    url: str
    sha256: str  # 64 lowercase hex
    size: int  # bytes of the file at the URL (for a bank: of the archive)
    version: str | None = None

    def __post_init__(self) -> None:
        # the sha256 names a directory of the store: nothing else may get that far
        if self.kind not in KINDS:
            raise ValueError(f"artifact kind {self.kind!r} is not one of {KINDS}")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"artifact sha256 {self.sha256!r} is not 64 lowercase hex digits")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"artifact size {self.size!r} is not a positive integer")
        problem = url_problem(self.url) if isinstance(self.url, str) else "is not a string"
        if problem is not None:
            raise ValueError(f"artifact URL {problem}")

    @classmethod
    def from_dict(cls, raw: object, kind: str, path: str, max_bytes: int) -> ArtifactRef:
        """Validate {url, sha256, size, version?} (other keys are the caller's business: pass only these);
        raises ConfigError naming the key at fault (f"{path}.sha256"). url: http or https only, no credentials
        in it, at most 2048 characters; size: an integer in [1, max_bytes]."""
        if kind not in KINDS:
            raise ValueError(f"artifact kind {kind!r} is not one of {KINDS}")
        if not isinstance(raw, dict):
            raise ConfigError(path, "must be a mapping {url, sha256, size, version?}", raw)
        for key in raw:
            if key not in REF_KEYS:
                raise ConfigError(f"{path}.{key}", f"is not an artifact key (an artifact has {', '.join(REF_KEYS)})",
                                  raw[key])
        for key in ("url", "sha256", "size"):
            if key not in raw:
                raise ConfigError(f"{path}.{key}", "is required")
        url = raw["url"]
        if not isinstance(url, str):
            raise ConfigError(f"{path}.url", "must be a string", url)
        problem = url_problem(url)
        if problem is not None:
            # a URL with credentials is not repeated: the error travels to logs and results
            raise ConfigError(f"{path}.url", problem, None if "@" in url else url)
        sha256 = raw["sha256"]
        if not isinstance(sha256, str) or not _HEX64.fullmatch(sha256):
            raise ConfigError(f"{path}.sha256", "must be 64 hexadecimal digits (the file's sha256)", sha256)
        size = raw["size"]
        if isinstance(size, bool) or not isinstance(size, int):
            raise ConfigError(f"{path}.size", "must be an integer (bytes)", size)
        if not 1 <= size <= max_bytes:
            raise ConfigError(f"{path}.size", f"must be between 1 and {max_bytes} bytes (fleet.max_artifact_bytes)",
                              size)
        version = raw.get("version")
        if version is not None and (not isinstance(version, str) or not 1 <= len(version) <= MAX_VERSION_CHARS):
            raise ConfigError(f"{path}.version", f"must be a string of 1 to {MAX_VERSION_CHARS} characters", version)
        return cls("model" if kind == "model" else "bank", url, sha256.lower(), size, version)


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int  # hard cap on any artifact (download and, for banks, the unpacked total)
    timeout_seconds: float  # wall-clock bound of the whole fetch (all attempts)
    min_free_bytes: int  # free space that must remain on the store's filesystem after the download
    read_timeout_seconds: float = 10.0  # socket timeout per connect / read
    ca_file: Path | None = None  # extra CA bundle for https (besides the system's)


def _no_progress(phase: str, percent: float | None) -> None:
    pass


def _no_self_test(path: Path) -> None:
    pass


class ArtifactStore:
    """Thread-safe; one fetch per sha256 at a time."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)  # <state_dir>/artifacts
        self.staging = self.root / STAGING
        self._lock = threading.Lock()
        self._busy: set[str] = set()  # sha256 of the fetches in progress

    def path_of(self, ref: ArtifactRef) -> Path | None:
        """The artifact's path if it is in the store: root/<sha256>/model.onnx, or the directory root/<sha256>/bank."""
        if ref.kind == "model":
            path = self.root / ref.sha256 / MODEL_FILE
            return path if path.is_file() else None
        path = self.root / ref.sha256 / BANK_DIR
        return path if path.is_dir() else None

    def fetch(self, ref: ArtifactRef, limits: FetchLimits, progress: Progress = _no_progress,
              self_test: SelfTest = _no_self_test, cancel: threading.Event | None = None) -> Path:
        """The artifact's path in the store, downloaded, verified, unpacked (a bank) and self-tested first if it
        is not there yet. Raises ArtifactError, and then nothing enters the store.

        progress(phase, percent) is told "downloading" (percent 0-100, about every 1 % or 0.5 s), "verifying",
        "unpacking" (a bank) and "self_test" (percent None); an exception it raises ends the fetch.
        self_test(path) gets the staged model file or bank directory; whatever it raises fails the fetch.
        cancel: once set, the fetch stops within a fraction of a second (ArtifactError "cancelled").
        """
        found = self.path_of(ref)
        if found is not None:
            return found
        with self._claim(ref):
            started = time.monotonic()
            try:
                path = _Fetch(self, ref, limits, progress, cancel, started + limits.timeout_seconds).run(self_test)
            except ArtifactError as exc:
                log.warning("artifact_failed", url=ref.url, sha256=ref.sha256, kind=ref.kind, error=str(exc))
                raise
            log.info("artifact_fetched", url=ref.url, sha256=ref.sha256, kind=ref.kind, bytes=ref.size,
                     seconds=round(time.monotonic() - started, 3))
            return path

    def keep_only(self, sha256s: set[str]) -> list[str]:
        """Delete every stored artifact but these, and staging leftovers (downloads, unpacked temporaries) of
        other artifacts; returns the sha256 of the artifacts deleted. Entries that are not the store's are left
        alone, and a fetch in progress keeps its files."""
        keep = {sha.lower() for sha in sha256s}
        deleted = []
        with self._lock:  # a fetch that starts now waits to claim its sha256 until the sweep is over
            spared = keep | self._busy
            for entry in _entries(self.root):
                sha, tmp, _ = entry.name.partition(_TMP)
                if not _SHA256.fullmatch(sha) or sha in spared:
                    continue
                if tmp:
                    _remove(entry)
                else:
                    self._delete_artifact(entry)
                    deleted.append(sha)
            for entry in _entries(self.staging):
                sha = entry.name.split(".", 1)[0]
                if _SHA256.fullmatch(sha) and sha not in spared:
                    _remove(entry)
        if deleted:
            log.info("artifacts_deleted", sha256s=sorted(deleted), kept=len(keep))
        return sorted(deleted)

    def disk_usage(self) -> int:
        """Bytes of the files under root (links not followed)."""
        total = 0
        for top, _dirs, files in os.walk(self.root):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(top, name)).st_size
        return total

    @contextlib.contextmanager
    def _claim(self, ref: ArtifactRef) -> Iterator[None]:
        with self._lock:
            if ref.sha256 in self._busy:
                raise ArtifactError(f"{ref.url}: already being fetched (sha256 {ref.sha256[:12]}…)")
            self._busy.add(ref.sha256)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(ref.sha256)

    def _delete_artifact(self, entry: Path) -> None:
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink(missing_ok=True)
            return
        # renamed away first, so that path_of never sees a half-deleted artifact
        doomed = Path(tempfile.mkdtemp(prefix=f"{entry.name}{_TMP}deleted-", dir=self.root))
        with contextlib.suppress(FileNotFoundError):
            os.rename(entry, doomed / "artifact")
        shutil.rmtree(doomed, ignore_errors=True)


class _Fetch:
    """One fetch of one artifact: download (with resumes) -> verify -> unpack -> self-test -> move in."""

    def __init__(self, store: ArtifactStore, ref: ArtifactRef, limits: FetchLimits, progress: Progress,
                 cancel: threading.Event | None, deadline: float) -> None:
        self.store, self.ref, self.limits, self.progress = store, ref, limits, progress
        self.cancel, self.deadline = cancel, deadline
        self.url = ref.url
        self.part = store.staging / f"{ref.sha256}.part"
        self._last_percent = -PROGRESS_STEP
        self._last_report = 0.0

    def run(self, self_test: SelfTest) -> Path:
        if self.ref.size > self.limits.max_bytes:
            raise ArtifactError(f"{self.url}: the declared size of {self.ref.size} bytes is over the limit of "
                                f"{self.limits.max_bytes} (fleet.max_artifact_bytes)")
        try:
            self.store.staging.mkdir(parents=True, exist_ok=True)
            self._download()
            self.check_running()
            self.progress("verifying", None)
            self._verify()
            return self._stage_and_move_in(self_test)
        except OSError as exc:  # the store's own disk: full, read-only, permissions
            raise ArtifactError(f"{self.url}: {exc}") from None

    def check_running(self) -> None:
        reason = self.stop_reason()
        if reason is not None:
            raise ArtifactError(f"{self.url}: {reason}")

    def stop_reason(self) -> str | None:
        if self.cancel is not None and self.cancel.is_set():
            return "cancelled"
        if time.monotonic() >= self.deadline:
            return f"timed out after {self.limits.timeout_seconds:g} s (fleet.download_timeout_seconds)"
        return None

    # --- download ----------------------------------------------------------------------------------

    def _download(self) -> None:
        opener = _opener(self.limits.ca_file)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                self._transfer(opener)
                return
            except _Interrupted as exc:
                pause = min(RETRY_PAUSE * 2 ** (attempt - 1), MAX_RETRY_PAUSE)
                if attempt == MAX_ATTEMPTS or time.monotonic() + pause >= self.deadline:
                    raise ArtifactError(str(exc)) from None
                log.warning("artifact_download_interrupted", url=self.url, error=str(exc), attempt=attempt,
                            retry_in=pause)
                if self.cancel is None:
                    time.sleep(pause)
                elif self.cancel.wait(pause):
                    self.check_running()

    def _transfer(self, opener: urllib.request.OpenerDirector) -> None:
        """One request: the whole file, or the rest of the .part. Raises _Interrupted when it ends early."""
        size = self.ref.size
        offset = self.part.stat().st_size if self.part.exists() else 0
        if offset > size:
            self.part.unlink()
            offset = 0
        if offset == size:  # a complete download that was not verified yet (a crash, a cancel)
            return
        self.check_running()
        free = shutil.disk_usage(self.store.staging).free
        if free < size - offset + self.limits.min_free_bytes:
            raise ArtifactError(f"{self.url}: not enough disk space in {self.store.staging}: needs {size - offset} "
                                f"bytes plus {self.limits.min_free_bytes} to keep free (fleet.min_free_bytes), "
                                f"{free} free")
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            log.info("artifact_download_resumed", url=self.url, sha256=self.ref.sha256, offset=offset, size=size)
        else:
            log.info("artifact_download_started", url=self.url, sha256=self.ref.sha256, size=size)
        timeout = min(self.limits.read_timeout_seconds, self.deadline - time.monotonic())
        response = self._open(opener, urllib.request.Request(self.url, headers=headers), timeout, offset)
        with response:
            offset = self._check_answer(response, offset)
            self._receive(response, offset)

    def _open(self, opener: urllib.request.OpenerDirector, request: urllib.request.Request, timeout: float,
              offset: int) -> Any:
        try:
            return opener.open(request, timeout=max(timeout, 0.001))
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and offset:  # the .part does not fit the file on the server: start over
                self.part.unlink(missing_ok=True)
                raise _Interrupted(f"{self.url}: HTTP 416 {exc.reason} for bytes {offset}- (download restarted)"
                                   ) from None
            raise ArtifactError(f"{self.url}: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            self.check_running()
            raise ArtifactError(f"{self.url}: cannot connect: {exc.reason}") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:  # a timeout, a reset, a garbled answer
            self.check_running()
            raise ArtifactError(f"{self.url}: no valid answer: {exc}") from None

    def _check_answer(self, response: Any, offset: int) -> int:
        """The offset the body starts at (0 when the server ignored the Range); refuses an answer whose length
        does not fit the declared size, before reading the body."""
        size = self.ref.size
        status = response.status
        if status == 206 and offset:
            content_range = response.headers.get("Content-Range") or ""
            match = _CONTENT_RANGE.fullmatch(content_range.strip())
            if match is None or int(match[1]) != offset or int(match[2]) != size - 1 or \
                    match[3] not in ("*", str(size)):
                self.part.unlink(missing_ok=True)
                raise ArtifactError(f"{self.url}: answered bytes={offset}- with Content-Range "
                                    f"{content_range!r}, expected bytes {offset}-{size - 1}/{size}")
        elif status == 200:
            if offset:
                log.info("artifact_resume_refused", url=self.url, offset=offset)
                offset = 0
        else:
            raise ArtifactError(f"{self.url}: HTTP {status} {response.reason}: expected 200 (or 206 to a Range)")
        length = response.headers.get("Content-Length")
        if length is not None and (not length.strip().isdigit() or int(length) != size - offset):
            self.part.unlink(missing_ok=True)
            part = f" from byte {offset}" if offset else ""
            raise ArtifactError(f"{self.url}: Content-Length {length.strip()}{part} disagrees with the declared size "
                                f"of {size} bytes")
        return offset

    def _receive(self, response: Any, offset: int) -> None:
        size = self.ref.size
        got, too_long, failure = offset, False, ""
        watchdog = _Watchdog(response, self)
        try:
            with open(self.part, "r+b" if offset else "wb") as out:
                out.seek(offset)
                out.truncate()
                self._report(got, force=True)
                try:
                    while got < size and self.stop_reason() is None:
                        chunk = response.read1(CHUNK)
                        if not chunk:
                            break
                        if got + len(chunk) > size:
                            too_long = True
                            break
                        out.write(chunk)
                        got += len(chunk)
                        self._report(got)
                    # without a Content-Length, only the end of the body proves the file is not longer
                    if got == size and response.headers.get("Content-Length") is None and response.read1(1):
                        too_long = True
                except http.client.IncompleteRead as exc:
                    failure = str(exc)
                except (OSError, http.client.HTTPException) as exc:  # a reset, a socket timeout, the watchdog
                    failure = str(exc) or type(exc).__name__
                out.flush()
                os.fsync(out.fileno())
        finally:
            watchdog.stop()
        if too_long:
            self.part.unlink(missing_ok=True)
            raise ArtifactError(f"{self.url}: the server sent more than the declared size of {size} bytes")
        if got == size:
            self._report(got, force=True)
            return
        reason = self.stop_reason()
        if reason is not None:
            raise ArtifactError(f"{self.url}: {reason}: got {got} of {size} bytes")
        raise _Interrupted(f"{self.url}: truncated: got {got} of {size} bytes" + (f" ({failure})" if failure else ""))

    def _report(self, got: int, force: bool = False) -> None:
        percent = 100.0 * got / self.ref.size
        now = time.monotonic()
        due = percent - self._last_percent >= PROGRESS_STEP or now - self._last_report >= PROGRESS_SECONDS
        if (force or due) and percent != self._last_percent:
            self._last_percent, self._last_report = percent, now
            self.progress("downloading", round(percent, 1))

    def _verify(self) -> None:
        size = self.part.stat().st_size
        if size != self.ref.size:
            self.part.unlink()
            raise ArtifactError(f"{self.url}: size mismatch: expected {self.ref.size} bytes, got {size}")
        digest = sha256_file(self.part)
        if digest != self.ref.sha256:
            self.part.unlink()
            raise ArtifactError(f"{self.url}: sha256 mismatch: expected {self.ref.sha256}, got {digest}")

    # --- into the store ----------------------------------------------------------------------------

    def _stage_and_move_in(self, self_test: SelfTest) -> Path:
        root = self.store.root
        tmp = Path(tempfile.mkdtemp(prefix=f"{self.ref.sha256}{_TMP}", dir=root))
        try:
            if self.ref.kind == "model":
                staged = tmp / MODEL_FILE
                os.replace(self.part, staged)
            else:
                self.progress("unpacking", None)
                staged = tmp / BANK_DIR
                self._unpack(staged)
                self.part.unlink()
            _fsync_tree(tmp)
            self.check_running()
            self.progress("self_test", None)
            try:
                self_test(staged)
            except Exception as exc:
                raise ArtifactError(f"{self.url}: self-test failed: {exc}") from exc
            dest = root / self.ref.sha256
            if dest.exists():  # path_of found no artifact of this kind there
                raise ArtifactError(f"{self.url}: {dest} already holds another kind of artifact with this sha256")
            os.rename(tmp, dest)
            fsync_path(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            self.part.unlink(missing_ok=True)
            raise
        path = self.store.path_of(self.ref)
        assert path is not None
        return path

    def _unpack(self, dest: Path) -> None:
        try:
            with tarfile.open(self.part, mode="r:*") as tar:
                members, total = self._checked_members(tar)
                free = shutil.disk_usage(dest.parent).free
                if free < total + self.limits.min_free_bytes:
                    raise ArtifactError(f"{self.url}: not enough disk space to unpack: needs {total} bytes plus "
                                        f"{self.limits.min_free_bytes} to keep free (fleet.min_free_bytes), "
                                        f"{free} free")
                dest.mkdir()
                # filter="data" is a second guard behind the checks above (links, devices, paths outside)
                tar.extractall(dest, members=self._while_running(members), filter="data")
        except ArtifactError:
            raise
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
            raise ArtifactError(f"{self.url}: cannot unpack the bank archive (.tar, .tar.gz, .tgz): {exc}") from None

    def _checked_members(self, tar: tarfile.TarFile) -> tuple[list[tarfile.TarInfo], int]:
        """The members to extract, named as they go into the bank directory, and their total size; refuses
        anything but regular files and directories, paths outside, too many members or too many bytes."""
        found: list[tuple[tuple[str, ...], tarfile.TarInfo]] = []
        seen: set[tuple[str, ...]] = set()
        total = 0
        for member in tar:  # headers one by one: a hostile archive is refused before the next is read
            if len(found) >= MAX_MEMBERS:
                raise ArtifactError(f"{self.url}: the bank archive has more than {MAX_MEMBERS} members "
                                    f"(at {member.name!r})")
            where = f"{self.url}: member {member.name!r}"
            if not (member.isreg() or member.isdir()) or member.issparse():
                raise ArtifactError(f"{where} is a {_type_name(member)}: a bank archive holds only regular files and "
                                    "directories")
            if member.name.startswith("/"):
                raise ArtifactError(f"{where} has an absolute path")
            parts = PurePosixPath(member.name).parts
            if ".." in parts:
                raise ArtifactError(f"{where} points outside the archive (..)")
            parts = tuple(p for p in parts if p != ".")
            if not parts:
                if member.isreg():
                    raise ArtifactError(f"{where} has no file name")
                continue  # "./", the archive's own top
            if parts in seen:
                raise ArtifactError(f"{where} appears twice")
            seen.add(parts)
            if member.isreg():
                total += member.size
                if total > self.limits.max_bytes:
                    raise ArtifactError(f"{where}: the bank archive unpacks to more than {self.limits.max_bytes} "
                                        "bytes (fleet.max_artifact_bytes)")
            found.append((parts, member))
        if not any(member.isreg() for _, member in found):
            raise ArtifactError(f"{self.url}: the bank archive holds no files")
        # a bank packed as its directory (press-bank/bank.json, ...) unpacks like one packed flat
        tops = {parts[0] for parts, _ in found}
        strip = len(tops) == 1 and all(len(parts) > 1 or member.isdir() for parts, member in found)
        members = []
        for parts, member in found:
            kept = parts[1:] if strip else parts
            if kept:
                members.append(member.replace(name="/".join(kept), deep=False))
        return members, total

    def _while_running(self, members: Iterable[tarfile.TarInfo]) -> Iterator[tarfile.TarInfo]:
        for member in members:
            self.check_running()
            yield member


class _Watchdog:
    """Shuts a transfer's socket down once the fetch is cancelled or past its deadline, so that a read blocked
    on a stalled or trickling server returns at once (a socket timeout would only end each read)."""

    def __init__(self, response: Any, fetch: _Fetch) -> None:
        self._sock = _socket_of(response)
        self._fetch = fetch
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="artifact-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(WATCH_SECONDS):
            if self._fetch.stop_reason() is not None:
                if self._sock is not None:
                    with contextlib.suppress(OSError):
                        self._sock.shutdown(socket.SHUT_RDWR)
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _socket_of(response: Any) -> socket.socket | None:
    """The socket under an http.client response (CPython: fp is a BufferedReader over a SocketIO); None if it
    cannot be found, and then only the socket timeout ends a stalled read."""
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


class _HttpRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects to http and https URLs only (urllib alone would also follow ftp)."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: http.client.HTTPMessage, newurl: str) -> urllib.request.Request | None:
        problem = url_problem(newurl)
        if problem is not None:
            fp.close()
            shown = "" if "@" in newurl else f" {newurl[:200]!r}"
            raise ArtifactError(f"{req.full_url}: redirected (HTTP {code}) to a URL{shown} that {problem}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(ca_file: Path | None) -> urllib.request.OpenerDirector:
    """http and https only (urlopen would also open file:, ftp: and data: URLs)."""
    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ArtifactError(f"{ca_file}: cannot load the CA bundle (fleet.ca_file): {exc}") from None
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler(context=context), urllib.request.HTTPDefaultErrorHandler(),
                    _HttpRedirects(), urllib.request.HTTPErrorProcessor(), urllib.request.UnknownHandler()):
        opener.add_handler(handler)
    return opener


def _type_name(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.isdev():
        return "device or fifo"
    if member.issparse():
        return "sparse file"
    return f"member of type {member.type!r}"


def _fsync_tree(top: Path) -> None:
    for directory, _dirs, files in os.walk(top):
        for name in files:
            fsync_path(os.path.join(directory, name))
        fsync_path(directory)


def _entries(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)
