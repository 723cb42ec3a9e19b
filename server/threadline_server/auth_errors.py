"""Why a token was refused: the cause a client sees, and the rate-limited line an operator sees.

Every refusal keeps its stable ErrorInfo reason (TOKEN_INVALID and friends: clients branch on
it) and adds which check failed, as a fixed phrase in the status message ("invalid token:
issuer not accepted") and as ErrorInfo metadata {"cause": "issuer"}. Causes name a check, never
a value from the token: claim values stay out of statuses and logs (bar section 2, step 12).
docs/auth-errors.md lists them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import StrEnum

import jwt
from jwt.exceptions import InvalidSubjectError

from threadline_server.errors import Unauthenticated


class Cause(StrEnum):
    """Which check refused a token; the value is the ErrorInfo metadata "cause"."""

    MISSING = "missing"
    MULTIPLE = "multiple"
    SCHEME = "scheme"
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    ALGORITHM = "algorithm"
    TYPE = "type"
    KID = "kid"
    CRIT = "crit"
    CATEGORY = "category"
    UNKNOWN_KEY = "unknown_key"
    SIGNATURE = "signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    ISSUER = "issuer"
    AUDIENCE = "audience"
    MISSING_CLAIM = "missing_claim"
    CLAIM_TYPE = "claim_type"
    SUBJECT = "subject"
    AZP = "azp"
    AZP_MISSING = "azp_missing"
    SESSION = "session"
    VERSION = "version"
    ACTOR = "actor"
    IMPERSONATION = "impersonation"


# The phrase after "invalid token: ". Fixed text per cause, so nothing from the token leaks.
_INVALID_PHRASES: dict[Cause, str] = {
    Cause.MULTIPLE: "more than one authorization value",
    Cause.SCHEME: "authorization is not 'Bearer <token>'",
    Cause.TOO_LARGE: "larger than 8 KiB",
    Cause.MALFORMED: "not a well-formed JWT",
    Cause.ALGORITHM: "algorithm not accepted (RS256 only)",
    Cause.TYPE: "header typ not accepted (JWT only)",
    Cause.KID: "key id (kid) missing or malformed",
    Cause.CRIT: "critical header (crit) not accepted",
    Cause.CATEGORY: "token category (cat) is not a session token",
    Cause.UNKNOWN_KEY: "signing key (kid) not published by the issuer",
    Cause.SIGNATURE: "signature does not verify",
    Cause.ISSUER: "issuer not accepted",
    Cause.AUDIENCE: "audience not accepted",
    Cause.MISSING_CLAIM: "a required claim is missing (exp, iat, nbf, iss, sub, sid)",
    Cause.CLAIM_TYPE: "a claim has the wrong type",
    Cause.SUBJECT: "subject not accepted",
    Cause.AZP: "authorized party (azp) not accepted",
    Cause.AZP_MISSING: "authorized party (azp) missing",
    Cause.SESSION: "not a session token (sid)",
    Cause.VERSION: "token version (v) not supported",
    Cause.ACTOR: "actor claim (act) malformed",
    Cause.IMPERSONATION: "impersonation (act) not allowed",
}


def token_missing() -> Unauthenticated:
    return Unauthenticated("TOKEN_MISSING", "missing token", cause=Cause.MISSING.value)


def token_invalid(cause: Cause) -> Unauthenticated:
    return Unauthenticated(
        "TOKEN_INVALID", f"invalid token: {_INVALID_PHRASES[cause]}", cause=cause.value
    )


def token_expired() -> Unauthenticated:
    return Unauthenticated("TOKEN_EXPIRED", "token expired", cause=Cause.EXPIRED.value)


def token_not_yet_valid() -> Unauthenticated:
    return Unauthenticated(
        "TOKEN_NOT_YET_VALID", "token not yet valid", cause=Cause.NOT_YET_VALID.value
    )


def pyjwt_header_cause(exc: jwt.PyJWTError) -> Cause:
    """The check behind PyJWT refusing a header (get_unverified_header checks kid and crit)."""
    if isinstance(exc, jwt.DecodeError):
        return Cause.MALFORMED
    # Both are plain InvalidTokenErrors; the message names the header ("Key ID ...", "'crit'").
    text = str(exc)
    if "Key ID" in text:
        return Cause.KID
    return Cause.CRIT if "crit" in text else Cause.MALFORMED


def pyjwt_cause(exc: jwt.PyJWTError) -> Cause:
    """The check behind a PyJWT refusal (expiry and nbf are handled before this)."""
    # InvalidSignatureError subclasses DecodeError, so it is tested first.
    if isinstance(exc, jwt.InvalidSignatureError | jwt.InvalidKeyError):
        return Cause.SIGNATURE
    if isinstance(exc, jwt.InvalidIssuerError):
        return Cause.ISSUER
    if isinstance(exc, jwt.InvalidAudienceError):
        return Cause.AUDIENCE
    if isinstance(exc, InvalidSubjectError):
        return Cause.SUBJECT
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return Cause.AUDIENCE if exc.claim == "aud" else Cause.MISSING_CLAIM
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return Cause.ALGORITHM
    # PyJWT raises DecodeError both for a payload that is not JSON and for an exp or nbf that
    # int() cannot read; only its message tells them apart ("... claim (exp) must be ...").
    if isinstance(exc, jwt.DecodeError) and "claim" not in str(exc):
        return Cause.MALFORMED
    return Cause.CLAIM_TYPE  # a registered claim PyJWT could not read (exp, nbf, iat, jti)


class RefusalLog:
    """Logs refused tokens at INFO: each cause at most once per `interval_s`.

    A client retrying a bad token in a loop then costs one line a minute per cause, and the
    next line says how many refusals it stood for. The clock is injectable so the rule can be
    tested without sleeping. State is one entry per cause, a closed set, so it stays bounded.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._logged_at: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def record(self, error: Unauthenticated) -> None:
        cause = error.cause or error.instance_reason
        now = self._clock()
        last = self._logged_at.get(cause)
        if last is not None and now - last < self._interval_s:
            self._unlogged[cause] = self._unlogged.get(cause, 0) + 1
            return
        self._logged_at[cause] = now
        also = self._unlogged.pop(cause, 0)
        self._logger.info(
            "token refused: %s (reason %s, cause %s)%s",
            error.message,
            error.instance_reason,
            cause,
            f"; {also} more since the last report" if also else "",
        )
