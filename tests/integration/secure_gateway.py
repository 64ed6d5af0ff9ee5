"""A loopback security gateway in front of Tansu, for the secured-cluster tests (test_secured.py).

Tansu 0.6 has no SASL and no working TLS listener, so the tests put this in front of it, the way a
TLS-terminating proxy fronts a broker: Tansu advertises the gateway's port, every client connection
goes through it. The gateway

* terminates TLS with a test CA's server certificate (``127.0.0.1`` / ``localhost``), optionally
  requiring a client certificate signed by that CA (mutual TLS);
* when ``users`` is given, runs the broker side of Kafka's SASL exchange itself (SaslHandshake v0-1,
  SaslAuthenticate v0-2, PLAIN and SCRAM-SHA-256/512 per RFC 5802), refuses any other request before
  authentication succeeds (as Kafka does), and forwards ApiVersions to Tansu (which lists both SASL
  keys);
* then relays bytes both ways.

It records what it saw (TLS handshakes, client certificate subjects, users authenticated, failures) so
a test can tell a secured session from one that silently went around it. It is test infrastructure:
the client side under test is kafka-python configured from elbert-stream's settings.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import os
import select
import socket
import ssl
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka.protocol.sasl import (
    SaslAuthenticateRequest,
    SaslAuthenticateResponse,
    SaslHandshakeRequest,
    SaslHandshakeResponse,
)

API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
SASL_AUTHENTICATION_FAILED, UNSUPPORTED_SASL_MECHANISM = 58, 33
SCRAM_HASHES = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}
MECHANISMS = ["PLAIN", *SCRAM_HASHES]


@dataclass
class Pki:
    """A throwaway CA with a server certificate for 127.0.0.1/localhost and a client certificate
    (CN ``client_cn``) whose key is encrypted with ``key_password``; all PEM files under ``root``."""

    root: Path
    key_password: str = "client-key-pw"
    client_cn: str = "elbert-worker"
    ca: Path = field(init=False)
    server_cert: Path = field(init=False)
    server_key: Path = field(init=False)
    client_cert: Path = field(init=False)
    client_key: Path = field(init=False)

    def __post_init__(self) -> None:
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.UTC)

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def cert(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool,
                 san: list[x509.GeneralName] | None = None) -> x509.Certificate:
            b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                 .public_key(key.public_key()).serial_number(x509.random_serial_number())
                 .not_valid_before(now - datetime.timedelta(minutes=5))
                 .not_valid_after(now + datetime.timedelta(days=1))
                 .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
            if san:
                b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
            return b.sign(issuer_key, hashes.SHA256())

        def write(path: Path, data: bytes) -> Path:
            path.write_bytes(data)
            return path

        def key_pem(key: Any, password: str | None = None) -> bytes:
            enc: Any = (serialization.BestAvailableEncryption(password.encode()) if password
                        else serialization.NoEncryption())
            return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)

        self.root.mkdir(parents=True, exist_ok=True)
        ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
        ca = cert("elbert test CA", ca_key, "elbert test CA", ca_key, True)
        server = cert("127.0.0.1", server_key, "elbert test CA", ca_key, False,
                      [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
        client = cert(self.client_cn, client_key, "elbert test CA", ca_key, False)
        pem = serialization.Encoding.PEM
        self.ca = write(self.root / "ca.pem", ca.public_bytes(pem))
        self.server_cert = write(self.root / "server.pem", server.public_bytes(pem))
        self.server_key = write(self.root / "server.key", key_pem(server_key))
        self.client_cert = write(self.root / "client.pem", client.public_bytes(pem))
        self.client_key = write(self.root / "client.key", key_pem(client_key, self.key_password))

    def server_context(self, require_client_cert: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.server_cert, self.server_key)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self.ca)
        return ctx


class ScramServer:
    """The server side of one SCRAM exchange (RFC 5802, no channel binding)."""

    def __init__(self, mechanism: str, users: dict[str, str], iterations: int = 4096) -> None:
        self.hash = SCRAM_HASHES[mechanism]
        self.users, self.iterations = users, iterations
        self.user: str | None = None
        self.done = False

    def _h(self, data: bytes) -> bytes:
        return hashlib.new(self.hash, data).digest()

    def _hmac(self, key: bytes, msg: bytes) -> bytes:
        return hmac.new(key, msg, self.hash).digest()

    def step(self, token: bytes) -> bytes:
        """Answer a client message; raise PermissionError when authentication fails."""
        msg = token.decode()
        if self.user is None:  # client-first: "n,,n=user,r=cnonce"
            gs2, _, bare = msg.partition(",,")
            attrs = dict(kv.split("=", 1) for kv in bare.split(","))
            user = attrs["n"].replace("=2C", ",").replace("=3D", "=")
            if gs2 not in ("n", "y") or user not in self.users:
                raise PermissionError(f"unknown user {user!r}")
            self.user, self.client_first_bare = user, bare
            self.salt = os.urandom(16)
            self.nonce = attrs["r"] + base64.b64encode(os.urandom(18)).decode()
            self.server_first = f"r={self.nonce},s={base64.b64encode(self.salt).decode()},i={self.iterations}"
            return self.server_first.encode()
        # client-final: "c=biws,r=nonce,p=proof"
        without_proof, _, proof_b64 = msg.rpartition(",p=")
        attrs = dict(kv.split("=", 1) for kv in without_proof.split(","))
        if attrs.get("r") != self.nonce:
            raise PermissionError("SCRAM nonce mismatch")
        salted = hashlib.pbkdf2_hmac(self.hash, self.users[self.user].encode(), self.salt, self.iterations)
        client_key = self._hmac(salted, b"Client Key")
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        signature = self._hmac(self._h(client_key), auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        if not hmac.compare_digest(proof, base64.b64decode(proof_b64)):
            raise PermissionError(f"wrong password for {self.user!r}")
        self.done = True
        server_signature = self._hmac(self._hmac(salted, b"Server Key"), auth_message)
        return b"v=" + base64.b64encode(server_signature)


class SecureGateway:
    """Listens on a free loopback port; relays each connection to ``target`` (host, port) after TLS
    (``tls``: a server SSLContext) and/or SASL (``users``: name -> password)."""

    def __init__(self, target: tuple[str, int], tls: ssl.SSLContext | None = None,
                 users: dict[str, str] | None = None) -> None:
        self.target, self.tls, self.users = target, tls, users
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.tls_handshakes = 0
        self.client_subjects: list[str] = []
        self.authenticated: list[tuple[str, str]] = []  # (mechanism, user)
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="gateway-accept").start()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()

    def _note(self, attr: str, value: Any) -> None:
        with self._lock:
            getattr(self, attr).append(value)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="gateway-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        upstream = None
        try:
            if self.tls is not None:
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    self._note("failures", f"TLS: {e}")
                    return
                with self._lock:
                    self.tls_handshakes += 1
                peer: Any = conn.getpeercert()
                if peer:
                    subject = {k: v for rdn in peer["subject"] for k, v in rdn}
                    self._note("client_subjects", subject["commonName"])
            upstream = socket.create_connection(self.target)
            if self.users is not None and not self._authenticate(conn, upstream):
                return
            self._relay(conn, upstream)
        except Exception as e:  # noqa: BLE001 - recorded: a test asserts there were none
            self._note("failures", f"connection: {e!r}")
        finally:
            for s in (conn, upstream):
                if s is not None:
                    s.close()

    @staticmethod
    def _read_frame(s: socket.socket) -> bytes | None:
        head = _recv_exactly(s, 4)
        if head is None:
            return None
        return _recv_exactly(s, struct.unpack(">i", head)[0])

    def _authenticate(self, conn: socket.socket, upstream: socket.socket) -> bool:
        """Serve the SASL exchange; True once authenticated, False (and the connection is dropped)
        on failure or on any request but ApiVersions before it."""
        mechanism: str | None = None
        scram: ScramServer | None = None
        while True:
            frame = self._read_frame(conn)
            if frame is None:
                return False
            api_key, version = struct.unpack(">hh", frame[:4])
            if api_key == API_VERSIONS:
                upstream.sendall(struct.pack(">i", len(frame)) + frame)
                answer = self._read_frame(upstream)
                if answer is None:
                    return False
                conn.sendall(struct.pack(">i", len(answer)) + answer)
            elif api_key == SASL_HANDSHAKE:
                req = SaslHandshakeRequest.decode(frame, version=version, header=True)
                ok = req.mechanism in MECHANISMS
                mechanism = req.mechanism if ok else None
                resp = SaslHandshakeResponse(error_code=0 if ok else UNSUPPORTED_SASL_MECHANISM,
                                             mechanisms=MECHANISMS)
                self._answer(conn, resp, req, version)
                if not ok:
                    self._note("failures", f"SASL: unsupported mechanism {req.mechanism}")
                    return False
                if mechanism in SCRAM_HASHES:
                    scram = ScramServer(mechanism, self.users or {})
            elif api_key == SASL_AUTHENTICATE and mechanism is not None:
                req = SaslAuthenticateRequest.decode(frame, version=version, header=True)
                try:
                    if scram is not None:
                        reply, user = scram.step(bytes(req.auth_bytes)), scram.user
                        done = scram.done
                    else:
                        _, user, password = bytes(req.auth_bytes).decode().split("\0")
                        if (self.users or {}).get(user) != password:
                            raise PermissionError(f"wrong password for {user!r}")
                        reply, done = b"", True
                except (PermissionError, ValueError, KeyError) as e:
                    self._note("failures", f"SASL {mechanism}: {e}")
                    self._answer(conn, SaslAuthenticateResponse(
                        error_code=SASL_AUTHENTICATION_FAILED, error_message=f"Authentication failed: {e}",
                        auth_bytes=b"", session_lifetime_ms=0), req, version)
                    self._linger(conn)
                    return False
                ok_resp = SaslAuthenticateResponse(error_code=0, error_message=None, auth_bytes=reply,
                                                   session_lifetime_ms=0)
                self._answer(conn, ok_resp, req, version)
                if done:
                    self._note("authenticated", (mechanism, user))
                    return True
            else:
                self._note("failures", f"request {api_key} before SASL authentication")
                return False

    @staticmethod
    def _linger(conn: socket.socket, bound_s: float = 2.0) -> None:
        """After an authentication failure, close only once the client has read the answer (it closes
        first) or ``bound_s`` passed, as a Kafka broker delays the close
        (``connection.failed.authentication.delay.ms``): an immediate close races the client's read of
        the error, which then sees only "socket disconnected" (seen on a loaded 2-core machine)."""
        conn.settimeout(bound_s)
        with contextlib.suppress(OSError):
            while conn.recv(4096):
                pass

    @staticmethod
    def _answer(conn: socket.socket, resp: Any, req: Any, version: int) -> None:
        resp.API_VERSION = version  # before the header: the setter would write a request field into it
        resp.with_header(correlation_id=req.header.correlation_id)
        conn.sendall(resp.encode(header=True, framed=True))

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        peers: dict[socket.socket, socket.socket] = {a: b, b: a}
        while not self._stop.is_set():
            ready: list[socket.socket] = [s for s in peers if isinstance(s, ssl.SSLSocket) and s.pending()]
            if not ready:
                ready = select.select(list(peers), [], [], 1.0)[0]
            for s in ready:
                data = s.recv(65536)
                if not data:
                    return
                peers[s].sendall(data)


def _recv_exactly(s: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
