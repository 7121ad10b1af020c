"""ZeroMQ CURVE encryption/authentication, and whether an address is exposed.

CURVE: the daemon's PUB socket is a CURVE server with its own key pair; a ZAP handler
(pyzmq's ThreadAuthenticator) admits only clients whose public keys are in a directory.
Plain or unknown subscribers get nothing. Keys are zmq.auth certificate files
(``name.key`` public, ``name.key_secret`` secret), made by ``retrofit-agent keys curve``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from retrofit_agent.contract.errors import ConfigError

# --------------------------------------------------------------------------- CURVE


def load_secret_certificate(path: Path, what: str) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what}: cannot read certificate {path}: {e}") from None
    if not secret:
        raise ConfigError(f"{what}: {path} holds no secret key (use the .key_secret file)")
    return public, secret


def load_public_key(path: Path, what: str) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what}: cannot read public key {path}: {e}") from None
    return public


def make_curve_server(socket: zmq.Socket, secret_cert: Path, authorized_dir: Path) -> ThreadAuthenticator:
    """Turn ``socket`` (before bind) into a CURVE server admitting only authorised clients."""
    if not authorized_dir.is_dir():
        raise ConfigError(f"publish.curve.authorized_keys_dir: not a directory: {authorized_dir}")
    public, secret = load_secret_certificate(secret_cert, "publish.curve.server_secret_key")
    auth = ThreadAuthenticator(socket.context)
    auth.start()
    auth.configure_curve(domain="*", location=str(authorized_dir))
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    return auth


def make_curve_client(socket: zmq.Socket, client_cert: Path, server_public: Path) -> None:
    public, secret = load_secret_certificate(client_cert, "client certificate")
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = load_public_key(server_public, "server public key")


def generate_curve_keys(directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


# --------------------------------------------------------------------------- exposure


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address or localhost."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    return is_loopback_host(host)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or hostname: treat as exposed
