"""ZeroMQ CURVE encryption/authentication and Ed25519 bundle signatures.

CURVE: the daemon's PUB socket is a CURVE server with its own key pair; a ZAP handler
(pyzmq's ThreadAuthenticator) admits only clients whose public keys are in a directory.
Plain or unknown subscribers get nothing. Keys are zmq.auth certificate files
(``name.key`` public, ``name.key_secret`` secret), made by ``retrofit-agent keys curve``.

Bundle signatures: ``manifest.json.sig`` holds an Ed25519 signature over the exact bytes
of ``manifest.json``; the manifest carries the sha256 of every other file, so one
signature covers the whole bundle. Made by ``retrofit-agent sign-bundle``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from retrofit_agent.errors import BundleError, ConfigError

SIGNATURE_NAME = "manifest.json.sig"


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


# --------------------------------------------------------------------------- signatures


def generate_signing_keys(directory: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private = directory / f"{name}.ed25519.pem"
    public = directory / f"{name}.ed25519.pub.pem"
    private.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ))
    return public, private


def sign_bundle(root: Path, private_key: Path) -> Path:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(private_key.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{private_key}: not an Ed25519 private key")
    out = root / SIGNATURE_NAME
    out.write_bytes(key.sign((root / "manifest.json").read_bytes()))
    return out


def verify_bundle_signature(root: Path, public_key: Path) -> None:
    """Raise BundleError unless ``manifest.json.sig`` is a valid signature by ``public_key``."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError:  # pragma: no cover - cryptography is a runtime dependency
        raise ConfigError("model.signing_public_key is set but the 'cryptography' package is missing") from None
    try:
        key = load_pem_public_key(public_key.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.signing_public_key: cannot read {public_key}: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"model.signing_public_key: {public_key} is not an Ed25519 public key")
    sig_path = root / SIGNATURE_NAME
    try:
        signature = sig_path.read_bytes()
        manifest = (root / "manifest.json").read_bytes()
    except FileNotFoundError as e:
        raise BundleError(f"bundle {root}: unsigned ({Path(e.filename).name} missing) but a signing key is configured") from None
    try:
        key.verify(signature, manifest)
    except InvalidSignature:
        raise BundleError(
            f"bundle {root}: signature does not match manifest.json (tampered, or signed by another key)"
        ) from None


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
