"""Ed25519 bundle signatures.

``manifest.json.sig`` holds an Ed25519 signature over the exact bytes of ``manifest.json``;
the manifest carries the sha256 of every other file, so one signature covers the whole
bundle. Made by ``retrofit-agent sign-bundle``, checked by bundle loading when
``model.signing_public_key`` is set.
"""

from __future__ import annotations

from pathlib import Path

from retrofit_agent.contract import keyfiles
from retrofit_agent.contract.errors import BundleError, ConfigError

SIGNATURE_NAME = "manifest.json.sig"


def generate_signing_keys(directory: Path, name: str, force: bool = False) -> tuple[Path, Path, str]:
    """Write ``NAME.ed25519.pem`` (private, 0600) and ``NAME.ed25519.pub.pem``.

    Returns (public path, private path, the public key's fingerprint). Existing files are
    refused unless ``force`` (see :mod:`retrofit_agent.contract.keyfiles`).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = directory / f"{name}.ed25519.pem"
    public = directory / f"{name}.ed25519.pub.pem"
    keyfiles.refuse_existing((private, public), force)
    keyfiles.prepare_directory(directory)
    key = Ed25519PrivateKey.generate()
    keyfiles.write_key_file(
        private,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        keyfiles.SECRET_MODE,
        force,
    )
    keyfiles.write_key_file(
        public,
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        keyfiles.PUBLIC_MODE,
        force,
    )
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return public, private, keyfiles.fingerprint(raw)


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
        raise BundleError(
            f"bundle {root}: unsigned ({Path(e.filename).name} missing) but a signing key is configured"
        ) from None
    try:
        key.verify(signature, manifest)
    except InvalidSignature:
        raise BundleError(
            f"bundle {root}: signature does not match manifest.json (tampered, or signed by another key)"
        ) from None
