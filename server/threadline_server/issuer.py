"""Dev mode's embedded token issuer: an RS256 key pair under data_dir/keys, its JWKS, minting.

Split from auth.py so that `threadline token` loads only this, the settings and the crypto
library: auth.py's verifier pulls in aiohttp, and the CLI's other commands the whole server.
`threadline_server.auth` re-exports what lives here. Tokens are signed with `cryptography`
directly rather than through PyJWT, whose import (every algorithm, X.509) would cost the CLI a
fifth of its start-up for a compact JWS that takes six lines; PyJWT still verifies them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from threadline_server.config import Settings
from threadline_server.durable import write_new_file

logger = logging.getLogger("threadline_server.auth")  # one logger for everything auth

MIN_RSA_BITS = 2048
# Above this a modulus is not a real signing key but a way to make every verification slow.
MAX_RSA_BITS = 16384
PRIVATE_KEY_FILE = "jwt_signing_key.pem"
PUBLIC_KEY_FILE = "jwt_signing_key.pub.pem"


def check_key_size(bits: int) -> None:
    """Raises ValueError unless an RSA modulus of `bits` is within MIN_RSA_BITS..MAX_RSA_BITS."""
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise ValueError(f"RSA key of {bits} bits; {MIN_RSA_BITS}..{MAX_RSA_BITS} required")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_uint(value: int) -> str:
    return _b64url(value.to_bytes((value.bit_length() + 7) // 8 or 1, "big"))


def _b64url_json(value: dict[str, Any]) -> str:
    return _b64url(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def rsa_public_jwk(key: rsa.RSAPublicKey) -> dict[str, str]:
    """The RFC 7517 members of an RSA public key: kty, n, e."""
    numbers = key.public_numbers()
    return {"kty": "RSA", "n": _b64url_uint(numbers.n), "e": _b64url_uint(numbers.e)}


def rsa_thumbprint(key: rsa.RSAPublicKey) -> str:
    """The RFC 7638 SHA-256 thumbprint: a kid that is the same wherever the key is loaded."""
    canonical = json.dumps(rsa_public_jwk(key), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class EmbeddedIssuer:
    """Dev mode's own issuer: an RS256 key pair under data_dir/keys, its JWKS, and minting."""

    def __init__(self, private_key: rsa.RSAPrivateKey, issuer: str) -> None:
        check_key_size(private_key.key_size)
        if not issuer:
            raise ValueError("issuer must be set")
        self._private_key = private_key
        self._issuer = issuer
        self._kid = rsa_thumbprint(private_key.public_key())

    @classmethod
    def load_or_create(cls, data_dir: Path, issuer: str) -> EmbeddedIssuer:
        """Loads data_dir/keys/jwt_signing_key.pem, generating it (mode 0600) on first use."""
        keys_dir = Path(data_dir) / "keys"
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_path = keys_dir / PRIVATE_KEY_FILE
        if not private_path.exists():
            key = rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS)
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            write_new_file(private_path, pem, 0o600)
            logger.info("created embedded signing key in %s", keys_dir)
        if private_path.stat().st_mode & 0o077:
            logger.warning("%s is readable by other users; chmod 600 it", private_path)
        loaded = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise ValueError(f"{private_path} does not hold an RSA private key")
        issuer_obj = cls(loaded, issuer)
        public_path = keys_dir / PUBLIC_KEY_FILE
        public_pem = issuer_obj.public_key_pem().encode("ascii")
        # Derived from the private key, so rewritten whenever it drifts (e.g. key replaced).
        if not public_path.exists() or public_path.read_bytes() != public_pem:
            public_path.unlink(missing_ok=True)
            write_new_file(public_path, public_pem, 0o644)
        return issuer_obj

    @property
    def issuer(self) -> str:
        return self._issuer

    @property
    def kid(self) -> str:
        return self._kid

    def public_key_pem(self) -> str:
        """The public key as PEM: usable as auth.public_key_pem for networkless verification."""
        data = self._private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return data.decode("ascii")

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The public JWKS document to serve at {issuer}/.well-known/jwks.json."""
        jwk = rsa_public_jwk(self._private_key.public_key())
        return {"keys": [{**jwk, "use": "sig", "alg": "RS256", "kid": self._kid}]}

    def mint(self, user_id: str, *, ttl_s: int, now: float | None = None, **extra: Any) -> str:
        """A session token for `user_id`; `extra` claims (name, email, azp, ...) are added last."""
        if not user_id:
            raise ValueError("user_id must not be empty")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "sub": user_id,
            "sid": f"sess_{secrets.token_hex(12)}",
            "iat": issued,
            "nbf": issued,
            "exp": issued + ttl_s,
            **extra,
        }
        # RFC 7515 compact serialization, RS256 = RSASSA-PKCS1-v1_5 with SHA-256 (RFC 7518 3.3).
        header = {"alg": "RS256", "kid": self._kid, "typ": "JWT"}
        signing_input = f"{_b64url_json(header)}.{_b64url_json(claims)}"
        signature = self._private_key.sign(
            signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
        )
        return f"{signing_input}.{_b64url(signature)}"


def embedded_issuer_url(settings: Settings, http_port: int) -> str:
    """The embedded issuer: auth.issuer, else the side HTTP listener that serves its JWKS."""
    return settings.auth.issuer or f"http://{settings.server.host}:{http_port}"


def mint_offline(settings: Settings, user_id: str, ttl_s: int | None, **claims: Any) -> str:
    """`threadline token`: signs with the data directory's key for the configured issuer.

    `ttl_s` None means auth.embedded_token_ttl_s; zero or less is a ValueError (never the
    default in disguise).
    """
    issuer = embedded_issuer_url(settings, settings.server.http_port)
    embedded = EmbeddedIssuer.load_or_create(settings.server.data_dir, issuer)
    ttl = settings.auth.embedded_token_ttl_s if ttl_s is None else ttl_s
    return embedded.mint(user_id, ttl_s=ttl, **claims)
