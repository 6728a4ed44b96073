"""How the agent reaches its broker: the TLS context built from the config (one for paho and for the checks),
and, when a connection fails, why: paho reports only that it failed, so a probe repeats the TCP connect and the
TLS handshake with the same settings and names the cause an operator can act on."""

from __future__ import annotations

import socket
import ssl

from edge_agent.agent.config import MqttConfig, TlsConfig
from edge_agent.errors import ConfigError

PROBE_SECONDS = 5.0


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """The client TLS context; a CA, certificate or key that does not load is a ConfigError naming the key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = not tls.insecure
    if tls.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(tls.ca_file))
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError("mqtt.tls.ca_file", f"cannot load it as PEM CA certificates ({_reason(exc)})",
                              str(tls.ca_file)) from None
    else:
        context.load_default_certs()
    if tls.cert_file is not None:
        try:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError("mqtt.tls.cert_file", f"cannot load the certificate and key_file as a PEM pair "
                              f"({_reason(exc)})", str(tls.cert_file)) from None
    return context


def diagnose(mqtt: MqttConfig, context: ssl.SSLContext | None, timeout: float = PROBE_SECONDS) -> str:
    """Why a connection to the broker fails, in a few words (what the probe saw at its first failing step)."""
    try:
        infos = socket.getaddrinfo(mqtt.host, mqtt.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"host not found ({exc.strerror})"
    last = "no address"
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(timeout)
                sock.connect(address)
                if context is None:
                    return "the broker accepts TCP connections; the MQTT handshake failed (credentials or protocol?)"
                cause = _handshake(sock, context, mqtt.host)
            if cause.startswith("TLS: the broker closed") and _speaks_plain_mqtt(address, family, timeout):
                return "TLS: the port does not speak TLS (it answers plain MQTT)"
            return cause
        except ConnectionRefusedError:
            last = "connection refused (nothing listens on that port)"
        except TimeoutError:
            last = f"no answer within {timeout:g} s (a firewall, or the wrong host)"
        except OSError as exc:
            last = f"cannot connect ({exc.strerror or exc})"
    return last


def _handshake(sock: socket.socket, context: ssl.SSLContext, host: str) -> str:
    try:
        with context.wrap_socket(sock, server_hostname=host):
            return "TLS works; the broker refused the MQTT connection (credentials or protocol?)"
    except ssl.SSLCertVerificationError as exc:
        if "hostname" in str(exc.verify_message or exc).lower() or "match" in str(exc).lower():
            return f"TLS: the certificate does not name {host} ({exc.verify_message})"
        return f"TLS: certificate verification failed ({exc.verify_message})"
    except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError):
        return "TLS: the broker closed the connection during the handshake (a client certificate it rejects?)"
    except ssl.SSLError as exc:
        if exc.reason in ("WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE"):
            return "TLS: the port does not speak TLS (a plain MQTT port?)"
        return f"TLS: handshake failed ({exc.reason or exc})"
    except TimeoutError:
        return "TLS: no answer to the handshake (a plain MQTT port?)"


# An MQTT 3.1.1 CONNECT: clean session, keepalive 60 s, empty client id. A broker answers it with a CONNACK.
_CONNECT = bytes([0x10, 0x0C, 0x00, 0x04]) + b"MQTT" + bytes([0x04, 0x02, 0x00, 0x3C, 0x00, 0x00])
_CONNACK = 0x20


def _speaks_plain_mqtt(address: tuple[object, ...], family: int, timeout: float) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.sendall(_CONNECT)
            return sock.recv(1)[:1] == bytes([_CONNACK])
    except OSError:
        return False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return getattr(exc, "strerror", None) or str(exc)
