"""The artifact store against a real HTTP server on loopback: resume, bounds, verification, bank archives,
self-tests, atomic moves into the store, clean-up."""

from __future__ import annotations

import datetime
import hashlib
import io
import ipaddress
import logging
import os
import random
import socket
import ssl
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_agent.agent.artifacts import MAX_ATTEMPTS, MAX_MEMBERS, ArtifactError, ArtifactRef, ArtifactStore, FetchLimits
from edge_agent.errors import ConfigError, EdgeAsdError
from edge_agent.model.encoder import Encoder
from edge_agent.scoring.bank_set import load_banks

from .agent_helpers import WINDOW, noise

DATA = random.Random(1).randbytes(200_000)
LIMITS = FetchLimits(max_bytes=10 << 20, timeout_seconds=10.0, min_free_bytes=0, read_timeout_seconds=5.0)
LOGGER = "edge_agent.agent.artifacts"


# --- the server ------------------------------------------------------------------------------------------


@dataclass
class Route:
    data: bytes = b""
    # file: 200, or 206 to a Range | truncate: every answer sends half its body, then closes | flaky: the first
    # answer sends `cut` bytes, then closes; later ones are "file" | norange: always 200, whole file | slow: 1 KB
    # every 0.2 s | stall: 1 KB, then nothing | more: no Content-Length, then the data | long: a Content-Length
    # 100 bytes too long | redirect: 302 to `location` | status: an error `status`
    mode: str = "file"
    cut: int = 0
    location: str = ""
    status: int = 500


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.sent: dict[str, int] = {}  # body bytes written per path
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def paths(self) -> list[str]:
        with self.lock:
            return [p for p, _ in self.requests]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up in the middle of a body


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        asked = self.headers.get("Range")
        with srv.lock:
            srv.requests.append((self.path, asked))
            seen = sum(1 for p, _ in srv.requests if p == self.path)
        route = srv.routes.get(self.path)
        if route is None or route.mode == "status":
            self.send_error(404 if route is None else route.status)
            return
        if route.mode == "redirect":
            self.send_response(302)
            self.send_header("Location", route.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data, mode = route.data, route.mode
        start = int(asked.removeprefix("bytes=").rstrip("-")) if asked and mode in ("file", "truncate", "flaky") else 0
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if mode == "more":
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(len(body) + (100 if mode == "long" else 0)))
        self.end_headers()
        if mode == "truncate":
            body = body[: len(body) // 2]
        elif mode == "flaky" and seen == 1:
            body = body[: route.cut]
        pieces = [body[i:i + 1024] for i in range(0, len(body), 1024)] if mode in ("slow", "stall") else [body]
        for i, piece in enumerate(pieces):
            self.wfile.write(piece)
            self.wfile.flush()
            with srv.lock:
                srv.sent[self.path] = srv.sent.get(self.path, 0) + len(piece)
            if mode == "stall":
                srv.stop.wait(10)
                break
            if mode == "slow" and i + 1 < len(pieces) and srv.stop.wait(0.2):
                break
        self.close_connection = True


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # loopback requests must not go through a proxy
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.stop.set()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "state" / "artifacts")


def serve(server: Server, path: str, data: bytes, kind: str = "model", expect: bytes | None = None,
          **route: Any) -> ArtifactRef:
    """Serve `data` at `path`; the reference declares the size and sha256 of `expect` (default: `data`)."""
    server.routes[path] = Route(data, **route)
    expect = data if expect is None else expect
    return ArtifactRef("model" if kind == "model" else "bank", server.url(path), sha(expect), len(expect))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def assert_nothing_stored(store: ArtifactStore, ref: ArtifactRef) -> None:
    assert store.path_of(ref) is None
    assert entries(store.root) == ["staging"], "no artifact and no temporary directory"
    assert entries(store.staging) == [], "no download left behind"


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"event={name} ")]


# --- downloads -------------------------------------------------------------------------------------------


def test_fetch_downloads_verifies_self_tests_and_then_answers_from_the_store(
        server: Server, store: ArtifactStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    ref = serve(server, "/m.onnx", DATA)
    phases: list[tuple[str, float | None]] = []
    tested: list[tuple[Path, bytes]] = []
    path = store.fetch(ref, LIMITS, progress=lambda phase, pct: phases.append((phase, pct)),
                       self_test=lambda p: tested.append((p, p.read_bytes())))
    assert path == store.root / ref.sha256 / "model.onnx" == store.path_of(ref)
    assert path.read_bytes() == DATA
    assert len(tested) == 1 and tested[0][1] == DATA
    assert tested[0][0] != path and ".tmp-" in tested[0][0].parent.name, "self-tested before it was moved in"
    downloading = [pct for phase, pct in phases if phase == "downloading"]
    assert downloading[0] == 0.0 and downloading[-1] == 100.0 and downloading == sorted(downloading)
    assert len(downloading) <= 102
    assert [phase for phase, _ in phases if phase != "downloading"] == ["verifying", "self_test"]
    assert entries(store.root) == sorted(["staging", ref.sha256]) and entries(store.staging) == []
    assert events(caplog, "artifact_download_started")
    (fetched,) = events(caplog, "artifact_fetched")
    assert f"sha256={ref.sha256}" in fetched and f"bytes={len(DATA)}" in fetched and "seconds=" in fetched
    assert store.disk_usage() == len(DATA)

    assert store.fetch(ref, LIMITS, self_test=lambda p: tested.append((p, b""))) == path
    assert server.paths() == ["/m.onnx"] and len(tested) == 1, "a stored artifact is neither fetched nor tested again"


def test_model_fetch_passes_an_encoder_self_test(server: Server, store: ArtifactStore, toy_model: Path) -> None:
    data = toy_model.read_bytes()
    ref = serve(server, "/power16.onnx", data)

    def loads_and_embeds(path: Path) -> None:
        embedded = Encoder(path).embed(noise(1, 0.05, 3)[None, :WINDOW])
        assert np.isfinite(embedded["layer_1"]).all()

    path = store.fetch(ref, LIMITS, self_test=loads_and_embeds)
    assert Encoder(path).model_sha256 == ref.sha256


def test_flaky_connection_completes_by_resuming_with_range(
        server: Server, store: ArtifactStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    ref = serve(server, "/flaky.onnx", DATA, mode="flaky", cut=70_000)
    path = store.fetch(ref, LIMITS)
    assert server.requests == [("/flaky.onnx", None), ("/flaky.onnx", "bytes=70000-")]
    assert sha(path.read_bytes()) == ref.sha256
    assert server.sent["/flaky.onnx"] == len(DATA), "the second request fetched only the rest"
    assert any("offset=70000" in line for line in events(caplog, "artifact_download_resumed"))


def test_truncated_transfers_keep_the_part_and_a_later_fetch_resumes_it(server: Server, store: ArtifactStore) -> None:
    ref = serve(server, "/cut.onnx", DATA, mode="truncate")
    with pytest.raises(ArtifactError, match=r"/cut.onnx: truncated: got (\d+) of 200000 bytes") as info:
        store.fetch(ref, LIMITS)
    got = int(str(info.value).split("got ")[1].split(" ")[0])
    assert len(server.requests) == MAX_ATTEMPTS, "each truncation is resumed, a bounded number of times"
    offsets = [int(r.removeprefix("bytes=").rstrip("-")) for _, r in server.requests[1:] if r]
    assert len(offsets) == MAX_ATTEMPTS - 1 and offsets == sorted(offsets) and offsets[0] == len(DATA) // 2
    part = store.staging / f"{ref.sha256}.part"
    assert part.stat().st_size == got and part.read_bytes() == DATA[:got]
    assert store.path_of(ref) is None

    # the same artifact at another URL: the download goes on where it stopped
    good = serve(server, "/good.onnx", DATA)
    assert good.sha256 == ref.sha256
    path = store.fetch(good, LIMITS)
    assert server.requests[-1] == ("/good.onnx", f"bytes={got}-")
    assert server.sent["/good.onnx"] == len(DATA) - got and path.read_bytes() == DATA


def test_a_server_that_ignores_range_is_read_from_the_start(server: Server, store: ArtifactStore) -> None:
    ref = serve(server, "/norange.onnx", DATA, mode="norange")
    store.staging.mkdir(parents=True)
    (store.staging / f"{ref.sha256}.part").write_bytes(b"stale bytes that are not the file" * 100)
    path = store.fetch(ref, LIMITS)
    assert server.requests == [("/norange.onnx", "bytes=3300-")]
    assert path.read_bytes() == DATA, "the 200 answer replaced the stale prefix"


def test_sha256_mismatch_deletes_the_download(server: Server, store: ArtifactStore) -> None:
    wrong = bytes(reversed(DATA))
    ref = serve(server, "/wrong.onnx", wrong, expect=DATA)
    with pytest.raises(ArtifactError) as info:
        store.fetch(ref, LIMITS)
    assert str(info.value) == f"{ref.url}: sha256 mismatch: expected {sha(DATA)}, got {sha(wrong)}"
    assert_nothing_stored(store, ref)


def test_content_length_that_disagrees_with_the_size_is_refused_before_the_body(
        server: Server, store: ArtifactStore) -> None:
    ref = serve(server, "/long.onnx", DATA, mode="long")
    with pytest.raises(ArtifactError, match=r"/long.onnx: Content-Length 200100 disagrees with the declared size "
                                            r"of 200000 bytes"):
        store.fetch(ref, LIMITS)
    assert_nothing_stored(store, ref)


def test_a_body_longer_than_declared_is_refused_and_never_written_beyond_the_size(
        server: Server, store: ArtifactStore) -> None:
    ref = serve(server, "/more.onnx", DATA + b"extra" * 1000, expect=DATA, mode="more")  # no Content-Length
    percents: list[float | None] = []
    with pytest.raises(ArtifactError, match=r"/more.onnx: the server sent more than the declared size of 200000"):
        store.fetch(ref, LIMITS, progress=lambda phase, pct: percents.append(pct))
    assert percents and max(p for p in percents if p is not None) <= 100.0
    assert_nothing_stored(store, ref)

    exact = serve(server, "/exact.onnx", DATA, mode="more")  # no Content-Length, and not a byte too many
    assert store.fetch(exact, LIMITS).read_bytes() == DATA


def test_a_slow_trickle_is_cut_off_by_the_overall_deadline(server: Server, store: ArtifactStore) -> None:
    ref = serve(server, "/slow.onnx", DATA, mode="slow")
    limits = FetchLimits(max_bytes=10 << 20, timeout_seconds=0.8, min_free_bytes=0, read_timeout_seconds=5.0)
    started = time.monotonic()
    with pytest.raises(ArtifactError, match=r"/slow.onnx: timed out after 0.8 s .*: got \d+ of 200000 bytes"):
        store.fetch(ref, limits)
    assert 0.7 < time.monotonic() - started < 1.4, "the deadline, not a socket timeout, ended it"
    part = store.staging / f"{ref.sha256}.part"
    assert 0 < part.stat().st_size < len(DATA), "what arrived is kept for a resume"
    assert store.path_of(ref) is None


def test_a_stalled_server_is_cut_off_by_the_deadline_not_the_socket_timeout(
        server: Server, store: ArtifactStore) -> None:
    ref = serve(server, "/stall.onnx", DATA, mode="stall")
    limits = FetchLimits(max_bytes=10 << 20, timeout_seconds=0.5, min_free_bytes=0, read_timeout_seconds=5.0)
    started = time.monotonic()
    with pytest.raises(ArtifactError, match=r"timed out after 0.5 s"):
        store.fetch(ref, limits)
    assert time.monotonic() - started < 1.2


def test_cancel_stops_a_fetch_promptly(server: Server, store: ArtifactStore) -> None:
    ref = serve(server, "/stall.onnx", DATA, mode="stall")
    cancel = threading.Event()
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    started = time.monotonic()
    with pytest.raises(ArtifactError, match=r"/stall.onnx: cancelled"):
        store.fetch(ref, LIMITS, cancel=cancel)
    assert time.monotonic() - started < 1.0
    timer.join()
    assert store.path_of(ref) is None

    other = serve(server, "/other.onnx", DATA[:1000])
    with pytest.raises(ArtifactError, match="cancelled"):
        store.fetch(other, LIMITS, cancel=cancel)
    assert "/other.onnx" not in server.paths(), "a cancelled fetch sends no request"


def test_one_fetch_per_artifact_at_a_time(server: Server, store: ArtifactStore) -> None:
    ref = serve(server, "/stall.onnx", DATA, mode="stall")
    cancel = threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        try:
            store.fetch(ref, LIMITS, cancel=cancel)
        except ArtifactError as exc:
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(ArtifactError, match="already being fetched"):
        store.fetch(ref, LIMITS)
    cancel.set()
    thread.join(5)
    assert len(errors) == 1 and "cancelled" in str(errors[0])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("path", "expected"), [
    ("/missing.onnx", "HTTP 404 Not Found"),
    ("/broken.onnx", "HTTP 500 Internal Server Error"),
    ("refused", "cannot connect: [Errno 111] Connection refused"),
    ("dns", "cannot connect:"),
])
def test_http_and_connection_errors_name_the_url_and_the_reason(
        server: Server, store: ArtifactStore, caplog: pytest.LogCaptureFixture, path: str, expected: str) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server.routes["/broken.onnx"] = Route(mode="status", status=500)
    url = {"refused": f"http://127.0.0.1:{_closed_port()}/m.onnx", "dns": "http://no-such-host.invalid/m.onnx"}.get(
        path, server.url(path))
    ref = ArtifactRef("model", url, sha(DATA), len(DATA))
    with pytest.raises(ArtifactError) as info:
        store.fetch(ref, LIMITS)
    assert str(info.value).startswith(f"{url}: {expected}")
    (failed,) = events(caplog, "artifact_failed")
    assert f"url={url}" in failed and expected.split(":")[0] in failed
    assert_nothing_stored(store, ref)


def test_redirects_are_followed_to_http_and_https_only(server: Server, store: ArtifactStore) -> None:
    serve(server, "/good.onnx", DATA)
    ref = serve(server, "/moved.onnx", b"", mode="redirect", location="/good.onnx", expect=DATA)
    assert store.fetch(ref, LIMITS).read_bytes() == DATA
    assert server.paths() == ["/moved.onnx", "/good.onnx"]

    to_ftp = serve(server, "/ftp.onnx", b"", mode="redirect", location="ftp://127.0.0.1/m.onnx", expect=DATA[:10])
    with pytest.raises(ArtifactError, match=r"/ftp.onnx: redirected \(HTTP 302\) to a URL 'ftp://127.0.0.1/m.onnx' "
                                            r"that is not an http or https URL"):
        store.fetch(to_ftp, LIMITS)
    to_file = serve(server, "/file.onnx", b"", mode="redirect", location="file:///etc/passwd", expect=DATA[:10])
    with pytest.raises(ArtifactError, match=r"/file.onnx: HTTP 302 .*not allowed"):
        store.fetch(to_file, LIMITS)
    assert server.paths()[-2:] == ["/ftp.onnx", "/file.onnx"], "neither redirect was followed"


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-asd test updates")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_with_an_extra_ca_bundle(server: Server, store: ArtifactStore, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    plain = serve(server, "/m.onnx", DATA)
    ref = ArtifactRef("model", plain.url.replace("http://", "https://"), plain.sha256, plain.size)
    with pytest.raises(ArtifactError, match=r"^https://127.0.0.1:\d+/m.onnx: cannot connect: .*CERTIFICATE_VERIFY"):
        store.fetch(ref, LIMITS)
    trusting = FetchLimits(max_bytes=10 << 20, timeout_seconds=10.0, min_free_bytes=0, ca_file=cert)
    assert store.fetch(ref, trusting).read_bytes() == DATA
    with pytest.raises(ArtifactError, match=r"nowhere.pem: cannot load the CA bundle"):
        store.fetch(ArtifactRef("model", ref.url, "a" * 64, 10),
                    FetchLimits(max_bytes=10 << 20, timeout_seconds=10.0, min_free_bytes=0,
                                ca_file=tmp_path / "nowhere.pem"))


# --- disk --------------------------------------------------------------------------------------------------


def test_a_download_too_big_for_the_disk_or_the_limit_is_refused_before_it_starts(
        server: Server, store: ArtifactStore) -> None:
    ref = serve(server, "/m.onnx", DATA)
    limits = FetchLimits(max_bytes=10 << 20, timeout_seconds=5.0, min_free_bytes=1 << 60)
    with pytest.raises(ArtifactError, match=rf"/m.onnx: not enough disk space in .*: needs 200000 bytes plus "
                                            rf"{1 << 60} to keep free .*, \d+ free"):
        store.fetch(ref, limits)
    assert server.requests == []
    assert_nothing_stored(store, ref)

    small = FetchLimits(max_bytes=len(DATA) - 1, timeout_seconds=5.0, min_free_bytes=0)
    with pytest.raises(ArtifactError, match=rf"/m.onnx: the declared size of 200000 bytes is over the limit of "
                                            rf"{len(DATA) - 1}"):
        store.fetch(ref, small)
    assert server.requests == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_an_artifact_bigger_than_a_small_disk_is_refused_before_download(server: Server, tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True, capture_output=True)
    try:
        store = ArtifactStore(mount)
        ref = serve(server, "/big.onnx", bytes(3 << 20))
        with pytest.raises(ArtifactError, match=r"/big.onnx: not enough disk space .*needs 3145728 bytes plus 0 "
                                                r"to keep free .*, \d+ free"):
            store.fetch(ref, LIMITS)
        assert server.requests == []
        assert_nothing_stored(store, ref)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# --- banks -------------------------------------------------------------------------------------------------


def _tar(add: Callable[[tarfile.TarFile], None], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:  # type: ignore[call-overload]
        add(tar)
    return buffer.getvalue()


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, linkname: str = "") -> Callable[
        [tarfile.TarFile], None]:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return add


def _bank_archive(bank_dir: Path, layout: str, mode: str) -> bytes:
    def add(tar: tarfile.TarFile) -> None:
        if layout == "nested":
            tar.add(bank_dir, arcname="press-bank-12")
        elif layout == "dot":
            tar.add(bank_dir, arcname=".")
        else:
            for child in sorted(bank_dir.iterdir()):
                tar.add(child, arcname=child.name)
    return _tar(add, mode)


@pytest.mark.parametrize(("layout", "mode", "path"), [
    ("flat", "w:gz", "/press-bank.tgz"),
    ("nested", "w:gz", "/press-bank.tar.gz"),
    ("dot", "w:", "/press-bank.tar.gz"),  # a plain tar behind a .tar.gz URL: read by content, not by name
])
def test_a_bank_archive_unpacks_into_the_store_and_loads_against_its_model(
        server: Server, store: ArtifactStore, toy_model: Path, bank_dir: Path, layout: str, mode: str,
        path: str) -> None:
    ref = serve(server, path, _bank_archive(bank_dir, layout, mode), kind="bank")
    member = Encoder(toy_model).member
    phases: list[str] = []
    stored = store.fetch(ref, LIMITS, progress=lambda phase, pct: phases.append(phase),
                         self_test=lambda p: load_banks(p, [member]) and None)
    assert stored == store.root / ref.sha256 / "bank" == store.path_of(ref)
    assert sorted(p.name for p in stored.iterdir()) == sorted(p.name for p in bank_dir.iterdir())
    assert load_banks(stored, [member]).content_hash() == load_banks(bank_dir, [member]).content_hash()
    assert [p for p in phases if p != "downloading"] == ["verifying", "unpacking", "self_test"]
    assert entries(store.root) == sorted(["staging", ref.sha256]) and entries(store.staging) == []


def test_a_bank_that_does_not_load_against_the_model_is_not_stored(
        server: Server, store: ArtifactStore, toy_model: Path, bank_dir: Path) -> None:
    (bank_dir / "bank.json").write_text("{}")
    ref = serve(server, "/bank.tgz", _bank_archive(bank_dir, "flat", "w:gz"), kind="bank")
    member = Encoder(toy_model).member
    with pytest.raises(ArtifactError, match=r"/bank.tgz: self-test failed: ") as info:
        store.fetch(ref, LIMITS, self_test=lambda p: load_banks(p, [member]) and None)
    assert isinstance(info.value.__cause__, EdgeAsdError)
    assert_nothing_stored(store, ref)


def _many_members(tar: tarfile.TarFile) -> None:
    for i in range(MAX_MEMBERS + 1):
        _member(f"f{i}")(tar)


def _with_bank_json(*adds: Callable[[tarfile.TarFile], None]) -> Callable[[tarfile.TarFile], None]:
    def add(tar: tarfile.TarFile) -> None:
        _member("bank.json", b"{}")(tar)
        for more in adds:
            more(tar)
    return add


HOSTILE = {
    "symlink": (_with_bank_json(_member("layer_1", kind=tarfile.SYMTYPE, linkname="/etc")),
                "member 'layer_1' is a symbolic link"),
    "hardlink": (_with_bank_json(_member("copy.json", kind=tarfile.LNKTYPE, linkname="bank.json")),
                 "member 'copy.json' is a hard link"),
    "fifo": (_with_bank_json(_member("pipe", kind=tarfile.FIFOTYPE)), "member 'pipe' is a device or fifo"),
    "device": (_with_bank_json(_member("disk", kind=tarfile.BLKTYPE)), "member 'disk' is a device or fifo"),
    "dotdot": (_with_bank_json(_member("../evil", b"x")), "member '../evil' points outside the archive"),
    "nested dotdot": (_with_bank_json(_member("layer_1/../../evil", b"x")), "member 'layer_1/../../evil' points"),
    "absolute": (_with_bank_json(_member("/tmp/evil", b"x")), "member '/tmp/evil' has an absolute path"),
    "duplicate": (_with_bank_json(_member("bank.json", b"[]")), "member 'bank.json' appears twice"),
    "too many members": (_many_members, f"has more than {MAX_MEMBERS} members (at 'f{MAX_MEMBERS}')"),
    "zip bomb": (_with_bank_json(_member("zeros.bin", bytes(2 << 20))),
                 f"member 'zeros.bin': the bank archive unpacks to more than {1 << 20} bytes"),
    "empty": (lambda tar: None, "the bank archive holds no files"),
}


@pytest.mark.parametrize("case", [*HOSTILE, "not a tar"])
def test_a_hostile_or_broken_bank_archive_is_refused_naming_the_member_and_leaves_nothing(
        server: Server, store: ArtifactStore, tmp_path: Path, case: str) -> None:
    if case == "not a tar":
        archive, expected = random.Random(2).randbytes(5000), "cannot unpack the bank archive (.tar, .tar.gz, .tgz)"
    else:
        add, expected = HOSTILE[case]
        archive = _tar(add)
    assert len(archive) < 1 << 20, "the archive itself is within the limit"
    ref = serve(server, "/bank.tgz", archive, kind="bank")
    limits = FetchLimits(max_bytes=1 << 20, timeout_seconds=10.0, min_free_bytes=0)
    tested: list[Path] = []
    with pytest.raises(ArtifactError) as info:
        store.fetch(ref, limits, self_test=tested.append)
    assert str(info.value).startswith(f"{ref.url}: ") and expected in str(info.value)
    assert tested == [], "refused before the self-test"
    assert_nothing_stored(store, ref)
    assert not list(tmp_path.rglob("*evil*")), "nothing was extracted anywhere"


def test_a_model_that_fails_its_self_test_is_not_stored(server: Server, store: ArtifactStore) -> None:
    ref = serve(server, "/m.onnx", b"this is not an ONNX model\n" * 100)
    with pytest.raises(ArtifactError, match=r"/m.onnx: self-test failed: .*cannot load ONNX model") as info:
        store.fetch(ref, LIMITS, self_test=lambda p: Encoder(p) and None)
    assert isinstance(info.value.__cause__, EdgeAsdError)
    assert_nothing_stored(store, ref)


# --- the store ---------------------------------------------------------------------------------------------


def test_a_crash_leftover_is_never_an_artifact_and_keep_only_cleans_it(server: Server, store: ArtifactStore) -> None:
    ref = serve(server, "/m.onnx", DATA)
    half = store.root / f"{ref.sha256}.tmp-x1y2"  # the process died before moving it in
    half.mkdir(parents=True)
    (half / "model.onnx").write_bytes(DATA[:100])
    store.staging.mkdir()
    (store.staging / f"{'e' * 64}.part").write_bytes(b"partial")
    assert store.path_of(ref) is None
    assert store.keep_only(set()) == []
    assert entries(store.root) == ["staging"] and entries(store.staging) == []
    assert store.fetch(ref, LIMITS).read_bytes() == DATA


def test_keep_only_deletes_other_artifacts_and_nothing_outside_the_store(
        server: Server, store: ArtifactStore, tmp_path: Path) -> None:
    keep = serve(server, "/a.onnx", DATA[:1000])
    drop = serve(server, "/b.onnx", DATA[:2000])
    bank = serve(server, "/c.tgz", _tar(_member("bank.json", b"{}")), kind="bank")
    for ref in (keep, drop, bank):
        store.fetch(ref, LIMITS)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep me")
    (store.root / ("f" * 64)).symlink_to(outside, target_is_directory=True)
    (store.root / "notes.txt").write_text("not an artifact")
    (store.staging / f"{keep.sha256}.part").write_bytes(b"resumable")
    (store.staging / f"{drop.sha256}.part").write_bytes(b"stale")

    assert store.keep_only({keep.sha256}) == sorted([drop.sha256, bank.sha256, "f" * 64])
    assert store.path_of(keep) is not None and store.path_of(drop) is None and store.path_of(bank) is None
    assert (outside / "precious").read_bytes() == b"keep me", "a link is removed, never followed"
    assert entries(store.root) == sorted(["notes.txt", "staging", keep.sha256])
    assert entries(store.staging) == [f"{keep.sha256}.part"]
    assert store.disk_usage() == 1000 + len("not an artifact") + len("resumable")

    missing = ArtifactStore(tmp_path / "nowhere")
    assert missing.keep_only({keep.sha256}) == [] and missing.disk_usage() == 0
    assert missing.path_of(keep) is None


# --- references --------------------------------------------------------------------------------------------

AT = "config.sources.press.bank"
GOOD = {"url": "https://updates.example/press-bank-12.tar.gz", "sha256": "4" * 64, "size": 880123}


@pytest.mark.parametrize(("change", "key", "fragment"), [
    ({"url": None}, "url", "is required"),
    ({"sha256": None}, "sha256", "is required"),
    ({"size": None}, "size", "is required"),
    ({"sha256": "4" * 63}, "sha256", "64 hexadecimal digits"),
    ({"sha256": "g" * 64}, "sha256", "64 hexadecimal digits"),
    ({"sha256": 44}, "sha256", "64 hexadecimal digits"),
    ({"url": "ftp://updates.example/bank.tgz"}, "url", "is not an http or https URL"),
    ({"url": "file:///etc/passwd"}, "url", "is not an http or https URL"),
    ({"url": "https://ops:secret@updates.example/bank.tgz"}, "url", "contains credentials"),
    ({"url": "https://updates.example/" + "a" * 2048}, "url", "longer than 2048 characters"),
    ({"url": "https://updates.example/a b"}, "url", "spaces or control characters"),
    ({"url": "https:///bank.tgz"}, "url", "has no host"),
    ({"url": 7}, "url", "must be a string"),
    ({"size": 0}, "size", "between 1 and 1000000 bytes"),
    ({"size": 1_000_001}, "size", "between 1 and 1000000 bytes"),
    ({"size": True}, "size", "must be an integer"),
    ({"size": 1.5}, "size", "must be an integer"),
    ({"version": ""}, "version", "1 to 128 characters"),
    ({"version": 3}, "version", "1 to 128 characters"),
    ({"providers": ["cpu"]}, "providers", "is not an artifact key"),
])
def test_from_dict_errors_name_the_key_path(change: dict[str, Any], key: str, fragment: str) -> None:
    raw = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        ArtifactRef.from_dict(raw, "bank", AT, max_bytes=1_000_000)
    assert info.value.path == f"{AT}.{key}" and fragment in info.value.message
    assert "secret" not in str(info.value), "credentials are never repeated"


def test_from_dict_accepts_a_reference_and_refuses_a_non_mapping() -> None:
    ref = ArtifactRef.from_dict({**GOOD, "sha256": "AB" * 32, "version": "12"}, "bank", AT, max_bytes=1_000_000)
    assert ref == ArtifactRef("bank", GOOD["url"], "ab" * 32, 880123, "12")
    with pytest.raises(ConfigError) as info:
        ArtifactRef.from_dict("https://updates.example/x.onnx", "model", "config.model", max_bytes=10)
    assert info.value.path == "config.model"
    with pytest.raises(ValueError, match="sha256"):  # the sha256 names a directory: never anything else
        ArtifactRef("model", GOOD["url"], "../" + "a" * 61, 10)
    with pytest.raises(ValueError, match="not an http or https URL"):
        ArtifactRef("model", "ftp://x/y", "a" * 64, 10)
