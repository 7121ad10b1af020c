"""ZeroMQ CURVE encryption/authentication, and whether an address is exposed.

CURVE: the daemon's PUB socket is a CURVE server with its own key pair; a ZAP handler
(pyzmq's ThreadAuthenticator) admits only clients whose public keys are in a directory.
Plain or unknown subscribers get nothing. Keys are zmq.auth certificate files
(``name.key`` public, ``name.key_secret`` secret), made by ``retrofit-agent keys curve``.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime, timezone
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from retrofit_agent.contract import keyfiles
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


def server_keys(secret_cert: Path) -> tuple[bytes, bytes]:
    """(public, secret) of the daemon's certificate: its PUB and its replay socket use the same."""
    return load_secret_certificate(secret_cert, "publish.curve.server_secret_key")


def make_curve_server(socket: zmq.Socket[bytes], secret_cert: Path, authorized_dir: Path) -> ThreadAuthenticator:
    """Turn ``socket`` (before bind) into a CURVE server admitting only authorised clients."""
    if not authorized_dir.is_dir():
        raise ConfigError(f"publish.curve.authorized_keys_dir: not a directory: {authorized_dir}")
    public, secret = server_keys(secret_cert)
    auth = ThreadAuthenticator(socket.context)
    auth.start()
    auth.configure_curve(domain="*", location=str(authorized_dir))
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    return auth


def make_curve_client(socket: zmq.Socket[bytes], client_cert: Path, server_public: Path) -> None:
    public, secret = load_secret_certificate(client_cert, "client certificate")
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = load_public_key(server_public, "server public key")


_PUBLIC_BANNER = """#   ****  Generated on {now} by retrofit-agent  ****
#   ZeroMQ CURVE Public Certificate
#   Exchange securely, or use a secure mechanism to verify the contents
#   of this file after exchange (compare its fingerprint).

"""
_SECRET_BANNER = """#   ****  Generated on {now} by retrofit-agent  ****
#   ZeroMQ CURVE **Secret** Certificate
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

"""


def _certificate(banner: str, public: bytes, secret: bytes | None = None) -> bytes:
    """The zmq.auth certificate format (what ``zmq.auth.load_certificate`` reads)."""
    text = banner.format(now=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    text += f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode()}"\n'
    return text.encode()


def generate_curve_keys(directory: Path, name: str, force: bool = False) -> tuple[Path, Path, str]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (0600) certificates.

    Returns (public path, secret path, the public key's fingerprint). Existing files are
    refused unless ``force`` (see :mod:`retrofit_agent.contract.keyfiles`).
    """
    public_path, secret_path = directory / f"{name}.key", directory / f"{name}.key_secret"
    keyfiles.refuse_existing((secret_path, public_path), force)
    keyfiles.prepare_directory(directory)
    public, secret = zmq.curve_keypair()
    keyfiles.write_key_file(secret_path, _certificate(_SECRET_BANNER, public, secret), keyfiles.SECRET_MODE, force)
    keyfiles.write_key_file(public_path, _certificate(_PUBLIC_BANNER, public), keyfiles.PUBLIC_MODE, force)
    return public_path, secret_path, keyfiles.fingerprint(z85.decode(public))


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
