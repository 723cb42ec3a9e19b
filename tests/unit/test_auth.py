"""Token verification (bar section 2): each rule rejects with its own reason, over real HTTP."""

from __future__ import annotations

import asyncio
import logging
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.jwks import JwksServer, SigningKey, encode_token
from threadline_server.auth import EmbeddedIssuer, TokenVerifier, check_pyjwt_version
from threadline_server.auth_errors import Cause, token_invalid
from threadline_server.config import AuthSettings
from threadline_server.domain.models import Principal
from threadline_server.errors import DomainError, Unavailable, reason_of

APP = "https://app.example.com"


class FakeClock:
    """The JWKS cache's monotonic clock, moved by hand so TTL and cooldown need no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


MakeVerifier = Callable[..., TokenVerifier]


@pytest.fixture(scope="session")
def key_a() -> SigningKey:
    return SigningKey.generate("key-a")


@pytest.fixture(scope="session")
def key_b() -> SigningKey:
    return SigningKey.generate("key-b")


@pytest.fixture(scope="session")
def weak_key() -> SigningKey:
    return SigningKey.generate("weak", bits=1024)


@pytest.fixture
async def jwks(key_a: SigningKey) -> AsyncIterator[JwksServer]:
    async with JwksServer([key_a]) as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_verifier(jwks: JwksServer, clock: FakeClock) -> AsyncIterator[MakeVerifier]:
    """Builds verifiers for the test issuer; keyword arguments are AuthSettings fields."""
    made: list[TokenVerifier] = []

    def make(
        *,
        issuer: str | None = None,
        jwks_url: str | None = None,
        timeout: float = 2.0,
        **fields: Any,
    ) -> TokenVerifier:
        verifier = TokenVerifier(
            AuthSettings(**fields),
            issuer=jwks.issuer if issuer is None else issuer,
            jwks_url=jwks.url if jwks_url is None else jwks_url,
            http_timeout_s=timeout,
            clock=clock,
        )
        made.append(verifier)
        return verifier

    yield make
    for verifier in made:
        await verifier.close()


@pytest.fixture
async def verifier(make_verifier: MakeVerifier) -> TokenVerifier:
    return make_verifier()


async def expect(awaitable: Awaitable[Principal], code: str, reason: str) -> DomainError:
    with pytest.raises(DomainError) as info:
        await awaitable
    assert (info.value.code, reason_of(info.value)) == (code, reason)
    return info.value


async def invalid(awaitable: Awaitable[Principal], cause: str) -> DomainError:
    """TOKEN_INVALID that names the check which refused it, in the message and the metadata."""
    err = await expect(awaitable, "UNAUTHENTICATED", "TOKEN_INVALID")
    assert err.metadata == {"cause": cause}
    assert err.message.startswith("invalid token: ")
    return err


def bearer(token: str) -> list[str]:
    return [f"Bearer {token}"]


# --- step 1: extraction ---


async def test_valid_token_gives_principal(verifier: TokenVerifier, jwks: JwksServer) -> None:
    now = int(time.time())
    token = jwks.mint(
        now=now,
        sub="user_123",
        sid="sess_42",
        name="Alice",
        email="alice@example.com",
        picture="https://img.example.com/a.png",
    )

    principal = await verifier.verify_authorization(bearer(token))

    assert principal == Principal(
        user_id="user_123",
        issuer=jwks.issuer,
        session_id="sess_42",
        expires_at=float(now + 300),
        display_name="Alice",
        email="alice@example.com",
        image_url="https://img.example.com/a.png",
    )


async def test_username_image_url_and_actor_claims(
    verifier: TokenVerifier, jwks: JwksServer
) -> None:
    token = jwks.mint(username="al", image_url="https://i/x", act={"sub": "user_admin"})
    principal = await verifier.verify_token(token)
    assert (principal.display_name, principal.image_url, principal.actor) == (
        "al",
        "https://i/x",
        "user_admin",
    )


async def test_malformed_act_is_refused(verifier: TokenVerifier, jwks: JwksServer) -> None:
    await invalid(verifier.verify_token(jwks.mint(act="user_admin")), "actor")


async def test_impersonation_refused_when_disabled(
    make_verifier: MakeVerifier, jwks: JwksServer
) -> None:
    strict = make_verifier(allow_impersonation=False)
    await invalid(strict.verify_token(jwks.mint(act={"sub": "user_admin"})), "impersonation")
    assert (await strict.verify_token(jwks.mint())).actor == ""


@pytest.mark.parametrize("values", [[], [""], ["  "]])
async def test_missing_authorization(verifier: TokenVerifier, values: list[str]) -> None:
    await expect(verifier.verify_authorization(values), "UNAUTHENTICATED", "TOKEN_MISSING")


async def test_empty_refresh_token_is_missing(verifier: TokenVerifier) -> None:
    await expect(verifier.verify_token(""), "UNAUTHENTICATED", "TOKEN_MISSING")


async def test_two_authorization_values_are_refused(
    verifier: TokenVerifier, jwks: JwksServer
) -> None:
    token = jwks.mint()
    await invalid(verifier.verify_authorization(bearer(token) * 2), "multiple")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_bearer_scheme_is_case_insensitive(
    verifier: TokenVerifier, jwks: JwksServer, scheme: str
) -> None:
    principal = await verifier.verify_authorization([f"{scheme} {jwks.mint()}"])
    assert principal.user_id == "user_alice"


@pytest.mark.parametrize(
    ("template", "cause"),
    [
        ("Basic {t}", "scheme"),
        ("Token {t}", "scheme"),
        ("{t}", "scheme"),
        ("Bearer", "scheme"),
        ("Bearer ", "scheme"),
        ("Bearer{t}", "scheme"),
        ("Bearer {t} extra", "scheme"),
        ("Bearer {t}=", "malformed"),
        ("Bearer a.b", "malformed"),
        ("Bearer a.b.c.d", "malformed"),
        ("Bearer a..c", "malformed"),
        ("Bearer a.b+c.d", "malformed"),
    ],
)
async def test_malformed_authorization_is_invalid(
    verifier: TokenVerifier, jwks: JwksServer, template: str, cause: str
) -> None:
    await invalid(verifier.verify_authorization([template.format(t=jwks.mint())]), cause)
    assert jwks.fetches == 0


async def test_authorization_over_8_kib_is_invalid(
    verifier: TokenVerifier, jwks: JwksServer
) -> None:
    def value_of_size(pad: int) -> str:
        return f"Bearer {jwks.mint(name='x' * pad)}"

    pad = 5000
    while len(value_of_size(pad + 1)) <= 8192:
        pad += 1
    largest, too_big = value_of_size(pad), value_of_size(pad + 1)
    assert len(largest) > 8180
    assert len(too_big) > 8192

    assert (await verifier.verify_authorization([largest])).display_name.startswith("x")
    await invalid(verifier.verify_authorization([too_big]), "too_large")
    await invalid(
        verifier.verify_token(value_of_size(pad + 10).removeprefix("Bearer ")), "too_large"
    )


# --- step 2: header, before any network ---


@pytest.mark.parametrize("alg", ["none", "None", "HS256", "RS512", "PS256", "ES256", "rs256", ""])
async def test_any_alg_but_rs256_is_refused_before_fetching(
    verifier: TokenVerifier, jwks: JwksServer, key_a: SigningKey, alg: str
) -> None:
    token = encode_token(
        {"alg": alg, "typ": "JWT", "kid": key_a.kid}, {"iss": jwks.issuer, "sub": "user_x"}
    )
    await invalid(verifier.verify_token(token), "algorithm")
    assert jwks.fetches == 0


async def test_alg_none_with_empty_signature_is_refused(
    verifier: TokenVerifier, jwks: JwksServer, key_a: SigningKey
) -> None:
    token = encode_token({"alg": "none", "kid": key_a.kid}, {"iss": jwks.issuer}, signature=b"")
    assert token.endswith(".")
    await invalid(verifier.verify_token(token), "malformed")


async def test_hs256_keyed_with_the_public_pem_is_refused(
    make_verifier: MakeVerifier, jwks: JwksServer, key_a: SigningKey
) -> None:
    claims = {"iss": jwks.issuer, "sub": "user_x", "sid": "s", "exp": time.time() + 60}
    header = {"alg": "HS256", "typ": "JWT", "kid": key_a.kid}
    token = encode_token(header, claims, hmac_secret=key_a.public_pem().encode())
    await invalid(make_verifier().verify_token(token), "algorithm")
    # The classic confusion attack targets a verifier holding the PEM itself: refused there too.
    await invalid(make_verifier(public_key_pem=key_a.public_pem()).verify_token(token), "algorithm")


@pytest.mark.parametrize(
    ("header", "cause"),
    [
        ({"typ": "at+jwt"}, "type"),
        ({"typ": "jwt"}, "type"),
        ({"kid": 7}, "kid"),
        ({"kid": None}, "kid"),
        ({"kid": ""}, "kid"),
        ({"kid": "k" * 65}, "kid"),
        ({"kid": "key a"}, "kid"),
        ({"crit": ["b64"], "b64": True}, "crit"),
        ({"crit": ["exp"]}, "crit"),
        ({"cat": "cl_other"}, "category"),
        ({"cat": ""}, "category"),
    ],
)
async def test_header_rules(
    verifier: TokenVerifier, jwks: JwksServer, header: dict[str, Any], cause: str
) -> None:
    await invalid(verifier.verify_token(jwks.mint(header=header)), cause)
    assert jwks.fetches == 0


@pytest.mark.parametrize(
    "header", [{"typ": None}, {"cat": "cl_B7d4PD111AAA"}, {"cat": "cl_I7d4PD111III"}]
)
async def test_header_variants_that_are_accepted(
    verifier: TokenVerifier, jwks: JwksServer, header: dict[str, Any]
) -> None:
    assert (await verifier.verify_token(jwks.mint(header=header))).user_id == "user_alice"


async def test_jku_header_is_never_fetched(
    verifier: TokenVerifier, jwks: JwksServer, key_b: SigningKey
) -> None:
    async with JwksServer([key_b]) as attacker:
        token = attacker.mint(issuer=jwks.issuer, header={"jku": attacker.url})
        await invalid(verifier.verify_token(token), "unknown_key")
        assert attacker.fetches == 0


# --- step 4: signature and registered claims ---


async def test_tampered_payload_is_refused(verifier: TokenVerifier, jwks: JwksServer) -> None:
    head, _, signature = jwks.mint(sub="user_alice").split(".")
    _, body, _ = jwks.mint(sub="user_mallory").split(".")
    await invalid(verifier.verify_token(f"{head}.{body}.{signature}"), "signature")


async def test_signature_by_another_key_under_a_known_kid_is_refused(
    verifier: TokenVerifier, jwks: JwksServer, key_b: SigningKey
) -> None:
    forged = SigningKey(key_b.private_key, jwks.keys[0].kid)
    await invalid(verifier.verify_token(jwks.mint(key=forged)), "signature")


async def test_expired_beyond_leeway(verifier: TokenVerifier, jwks: JwksServer) -> None:
    token = jwks.mint(exp=int(time.time()) - 30)
    err = await expect(verifier.verify_token(token), "UNAUTHENTICATED", "TOKEN_EXPIRED")
    assert err.message == "token expired"
    assert err.metadata == {"cause": "expired"}


async def test_expired_within_leeway_is_accepted(verifier: TokenVerifier, jwks: JwksServer) -> None:
    token = jwks.mint(exp=int(time.time()) - 2)
    assert (await verifier.verify_token(token)).user_id == "user_alice"


async def test_leeway_is_configurable(make_verifier: MakeVerifier, jwks: JwksServer) -> None:
    token = jwks.mint(exp=int(time.time()) - 2)
    await expect(make_verifier(leeway_s=0).verify_token(token), "UNAUTHENTICATED", "TOKEN_EXPIRED")


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_not_yet_valid(verifier: TokenVerifier, jwks: JwksServer, claim: str) -> None:
    claims: dict[str, Any] = {claim: int(time.time()) + 60}
    token = jwks.mint(**claims)
    await expect(verifier.verify_token(token), "UNAUTHENTICATED", "TOKEN_NOT_YET_VALID")


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_slightly_future_nbf_and_iat_are_within_leeway(
    verifier: TokenVerifier, jwks: JwksServer, claim: str
) -> None:
    claims: dict[str, Any] = {claim: int(time.time()) + 2}
    token = jwks.mint(**claims)
    assert (await verifier.verify_token(token)).user_id == "user_alice"


@pytest.mark.parametrize(
    "make_iss",
    [
        lambda iss: iss + "/",
        lambda iss: iss[:-1],
        lambda iss: iss + "0",
        lambda iss: iss.upper(),
        lambda iss: "https://evil.example.com",
        lambda iss: [iss],
        lambda iss: "",
    ],
)
async def test_wrong_issuer(
    verifier: TokenVerifier, jwks: JwksServer, make_iss: Callable[[str], Any]
) -> None:
    await invalid(verifier.verify_token(jwks.mint(iss=make_iss(jwks.issuer))), "issuer")


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf", "iss", "sub", "sid"])
async def test_required_claims(verifier: TokenVerifier, jwks: JwksServer, claim: str) -> None:
    await invalid(verifier.verify_token(jwks.mint(drop=[claim])), "missing_claim")


async def test_audience_is_refused_unless_configured(
    make_verifier: MakeVerifier, jwks: JwksServer
) -> None:
    token = jwks.mint(aud="threadline")
    await invalid(make_verifier().verify_token(token), "audience")
    assert (await make_verifier(audience="threadline").verify_token(token)).user_id
    await invalid(make_verifier(audience="threadline").verify_token(jwks.mint()), "audience")
    await invalid(
        make_verifier(audience="threadline").verify_token(jwks.mint(aud="other")), "audience"
    )


# --- step 5 onwards: claim types and values PyJWT lets through ---


@pytest.mark.parametrize(
    ("claims", "cause"),
    [
        ({"exp": "9999999999"}, "claim_type"),
        ({"exp": "soon"}, "claim_type"),
        ({"nbf": "0"}, "claim_type"),
        ({"nbf": False}, "claim_type"),
        ({"iat": "0"}, "claim_type"),
        ({"iat": True}, "claim_type"),
        ({"exp": [9999999999]}, "claim_type"),
        ({"exp": 10**400}, "claim_type"),
        ({"sub": ""}, "subject"),
        ({"sub": 123}, "subject"),
        ({"sub": "user with spaces"}, "subject"),
        ({"sid": ""}, "session"),
        ({"sid": 42}, "session"),
        ({"azp": 1}, "azp"),
        ({"v": 1}, "version"),
        ({"v": "2"}, "version"),
        ({"v": True}, "version"),
    ],
)
async def test_claim_types_and_values(
    verifier: TokenVerifier, jwks: JwksServer, claims: dict[str, Any], cause: str
) -> None:
    await invalid(verifier.verify_token(jwks.mint(**claims)), cause)


async def test_claim_version_2_is_accepted(verifier: TokenVerifier, jwks: JwksServer) -> None:
    assert (await verifier.verify_token(jwks.mint(v=2))).user_id == "user_alice"


async def test_subject_pattern_is_configurable(
    make_verifier: MakeVerifier, jwks: JwksServer
) -> None:
    clerkish = make_verifier(subject_pattern=r"^user_[A-Za-z0-9]+$")
    assert (await clerkish.verify_token(jwks.mint(sub="user_2abc"))).user_id == "user_2abc"
    await invalid(clerkish.verify_token(jwks.mint(sub="user_2abc\n")), "subject")
    await invalid(clerkish.verify_token(jwks.mint(sub="org_2abc")), "subject")


@pytest.mark.parametrize("azp", [APP, "https://other.example.com"])
async def test_azp_exact_match_accepted(
    make_verifier: MakeVerifier, jwks: JwksServer, azp: str
) -> None:
    verifier = make_verifier(authorized_parties=[APP, "https://other.example.com"])
    assert (await verifier.verify_token(jwks.mint(azp=azp))).user_id == "user_alice"


@pytest.mark.parametrize(
    "azp",
    [APP + "/", "https://APP.example.com", "http://app.example.com", APP + ":443", "https://evil"],
)
async def test_wrong_azp_is_refused(
    make_verifier: MakeVerifier, jwks: JwksServer, azp: str
) -> None:
    verifier = make_verifier(mode="clerk", authorized_parties=[APP])
    await invalid(verifier.verify_token(jwks.mint(azp=azp)), "azp")


async def test_missing_azp_is_refused_unless_allowed(
    make_verifier: MakeVerifier, jwks: JwksServer
) -> None:
    token = jwks.mint()
    await invalid(make_verifier(authorized_parties=[APP]).verify_token(token), "azp_missing")
    lenient = make_verifier(authorized_parties=[APP], allow_missing_azp=True)
    assert (await lenient.verify_token(token)).user_id == "user_alice"
    # The escape hatch is for a missing azp only: a wrong one is still refused.
    await invalid(lenient.verify_token(jwks.mint(azp="https://evil")), "azp")


async def test_azp_is_not_checked_without_authorized_parties(
    verifier: TokenVerifier, jwks: JwksServer
) -> None:
    assert (await verifier.verify_token(jwks.mint(azp="https://any"))).user_id == "user_alice"


async def test_pending_session(make_verifier: MakeVerifier, jwks: JwksServer) -> None:
    token = jwks.mint(sts="pending")
    err = await expect(make_verifier().verify_token(token), "PERMISSION_DENIED", "SESSION_PENDING")
    assert type(err).__name__ == "SessionPending"
    relaxed = make_verifier(reject_pending_sessions=False)
    assert (await relaxed.verify_token(token)).user_id == "user_alice"
    assert (await make_verifier().verify_token(jwks.mint(sts="active"))).user_id


async def test_rejections_never_echo_claims(
    verifier: TokenVerifier, jwks: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    marker = "user_MARKER9f3"
    for token in (
        jwks.mint(sub=marker, exp=int(time.time()) - 60),
        jwks.mint(sub=marker, iss="https://MARKER9f3"),
        jwks.mint(sub=marker, exp="9999999999"),
    ):
        with pytest.raises(DomainError) as info:
            await verifier.verify_token(token)
        assert "MARKER9f3" not in str(info.value)
        assert "MARKER9f3" not in repr(info.value.metadata)
        assert info.value.message in {
            "token expired",
            "invalid token: issuer not accepted",
            "invalid token: a claim has the wrong type",
        }
    assert "token refused" in caplog.text  # the refusals were logged, without the claims
    assert "MARKER9f3" not in caplog.text


# --- which check refused: the message and ErrorInfo metadata name it; the log says it once ---


async def test_refusals_name_their_check_in_plain_words(
    verifier: TokenVerifier, jwks: JwksServer
) -> None:
    token = jwks.mint()
    cases = [
        (verifier.verify_token(jwks.mint(iss="https://other.example.com")), "issuer"),
        (verifier.verify_authorization([token]), "scheme"),  # no `Bearer ` prefix
        (verifier.verify_token(jwks.mint(sub="bad user!")), "subject"),
    ]
    messages = [(await invalid(call, cause)).message for call, cause in cases]
    assert messages == [
        "invalid token: issuer not accepted",
        "invalid token: authorization is not 'Bearer <token>'",
        "invalid token: subject not accepted",
    ]
    missing = await expect(verifier.verify_authorization([]), "UNAUTHENTICATED", "TOKEN_MISSING")
    assert (missing.message, missing.metadata) == ("missing token", {"cause": "missing"})


def test_every_invalid_cause_has_its_own_phrase() -> None:
    others = {Cause.MISSING, Cause.EXPIRED, Cause.NOT_YET_VALID}  # reasons of their own
    causes = [cause for cause in Cause if cause not in others]
    errors = [token_invalid(cause) for cause in causes]
    assert len({e.message for e in errors}) == len(errors)
    assert all(e.message.startswith("invalid token: ") for e in errors)
    assert [e.metadata for e in errors] == [{"cause": c.value} for c in causes]


async def test_each_cause_is_logged_once_a_minute(
    verifier: TokenVerifier, jwks: JwksServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="threadline_server.auth")

    def refusals() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.INFO and r.getMessage().startswith("token refused")
        ]

    foreign = jwks.mint(iss="https://other.example.com")
    for _ in range(3):
        await invalid(verifier.verify_token(foreign), "issuer")
    await invalid(verifier.verify_authorization([foreign]), "scheme")  # another cause: logged
    await invalid(
        verifier.verify_authorization(bearer(foreign)), "issuer"
    )  # logged once, not twice
    assert refusals() == [
        "token refused: invalid token: issuer not accepted (reason TOKEN_INVALID, cause issuer)",
        "token refused: invalid token: authorization is not 'Bearer <token>' "
        "(reason TOKEN_INVALID, cause scheme)",
    ]
    clock.advance(59.9)
    await invalid(verifier.verify_token(foreign), "issuer")
    assert len(refusals()) == 2
    clock.advance(0.1)  # a minute after the first line
    await invalid(verifier.verify_token(foreign), "issuer")
    assert refusals()[2:] == [
        "token refused: invalid token: issuer not accepted (reason TOKEN_INVALID, cause issuer)"
        "; 4 more since the last report"
    ]
    await invalid(verifier.verify_token(foreign), "issuer")
    assert len(refusals()) == 3


# --- step 3 and section 2.1: keys by kid, JWKS cache ---


async def test_unknown_kid_refetches_once_then_refuses(
    verifier: TokenVerifier, jwks: JwksServer, clock: FakeClock, key_a: SigningKey
) -> None:
    await verifier.start()
    assert jwks.fetches == 1
    ghost = SigningKey(key_a.private_key, "ghost")
    clock.advance(31)  # past the cooldown the startup fetch began

    await invalid(verifier.verify_token(jwks.mint(key=ghost)), "unknown_key")
    assert jwks.fetches == 2
    await invalid(verifier.verify_token(jwks.mint(key=ghost)), "unknown_key")
    assert jwks.fetches == 2


async def test_unknown_kids_are_bounded_by_the_cooldown(
    verifier: TokenVerifier, jwks: JwksServer, clock: FakeClock, key_a: SigningKey
) -> None:
    await verifier.start()
    clock.advance(31)
    for i in range(20):
        ghost = SigningKey(key_a.private_key, f"ghost-{i}")
        await invalid(verifier.verify_token(jwks.mint(key=ghost)), "unknown_key")
        clock.advance(1)
    assert jwks.fetches == 2  # startup + one forced refetch in 20 s of unknown kids
    clock.advance(30)
    await invalid(
        verifier.verify_token(jwks.mint(key=SigningKey(key_a.private_key, "late"))), "unknown_key"
    )
    assert jwks.fetches == 3


async def test_rotated_in_kid_is_accepted_after_refetch(
    verifier: TokenVerifier,
    jwks: JwksServer,
    clock: FakeClock,
    key_a: SigningKey,
    key_b: SigningKey,
) -> None:
    await verifier.start()
    jwks.keys = [key_a, key_b]
    token = jwks.mint(key=key_b)
    # Within the cooldown of the last fetch the new kid is not fetched yet (PyJWKClient too).
    await invalid(verifier.verify_token(token), "unknown_key")
    assert jwks.fetches == 1
    clock.advance(30)
    assert (await verifier.verify_token(token)).user_id == "user_alice"
    assert jwks.fetches == 2
    assert (await verifier.verify_token(jwks.mint(key=key_a))).user_id == "user_alice"
    assert jwks.fetches == 2


async def test_removed_kid_is_refused_after_the_ttl(
    verifier: TokenVerifier,
    jwks: JwksServer,
    clock: FakeClock,
    key_a: SigningKey,
    key_b: SigningKey,
) -> None:
    await verifier.start()
    token = jwks.mint(key=key_a)
    jwks.keys = [key_b]
    clock.advance(299)
    assert (await verifier.verify_token(token)).user_id == "user_alice"  # still fresh
    clock.advance(1)
    await invalid(verifier.verify_token(token), "unknown_key")
    assert jwks.fetches == 2


async def test_concurrent_verifications_share_one_fetch(
    verifier: TokenVerifier, jwks: JwksServer
) -> None:
    jwks.delay_s = 0.2
    tokens = [jwks.mint(sub=f"user_{i}") for i in range(10)]
    principals = await asyncio.gather(*(verifier.verify_token(t) for t in tokens))
    assert [p.user_id for p in principals] == [f"user_{i}" for i in range(10)]
    assert jwks.fetches == 1


async def test_known_kid_does_not_wait_for_a_refetch(
    verifier: TokenVerifier, jwks: JwksServer, clock: FakeClock, key_a: SigningKey
) -> None:
    await verifier.start()
    clock.advance(31)
    jwks.delay_s = 5.0
    ghost = asyncio.create_task(
        verifier.verify_token(jwks.mint(key=SigningKey(key_a.private_key, "ghost")))
    )
    await jwks.wait_fetches(2)  # the ghost's refetch has reached the server and is held there
    principal = await asyncio.wait_for(verifier.verify_token(jwks.mint()), 1.0)
    assert principal.user_id == "user_alice"
    jwks.release()
    await expect(ghost, "UNAUTHENTICATED", "TOKEN_INVALID")


async def test_weak_jwk_is_never_used(
    verifier: TokenVerifier, jwks: JwksServer, weak_key: SigningKey
) -> None:
    jwks.extra_jwks = [weak_key.jwk()]
    await invalid(verifier.verify_token(jwks.mint(key=weak_key)), "unknown_key")
    assert jwks.fetches == 1  # fetched, and the 1024-bit key was not taken from it


@pytest.mark.parametrize(
    "overrides",
    [{"kty": "EC"}, {"use": "enc"}, {"alg": "RS512"}, {"alg": "HS256"}, {"n": "!!"}, {"e": None}],
)
async def test_unusable_jwks_entries_are_skipped(
    verifier: TokenVerifier, jwks: JwksServer, key_b: SigningKey, overrides: dict[str, Any]
) -> None:
    jwks.extra_jwks = [key_b.jwk(**overrides)]
    await invalid(verifier.verify_token(jwks.mint(key=key_b)), "unknown_key")
    assert (await verifier.verify_token(jwks.mint())).user_id == "user_alice"


async def test_jwk_without_use_and_alg_is_accepted(
    verifier: TokenVerifier, jwks: JwksServer, key_b: SigningKey
) -> None:
    jwks.extra_jwks = [key_b.jwk(use=None, alg=None)]
    assert (await verifier.verify_token(jwks.mint(key=key_b))).user_id == "user_alice"


async def test_duplicate_kid_in_jwks_is_not_trusted(
    verifier: TokenVerifier, jwks: JwksServer, key_a: SigningKey, key_b: SigningKey
) -> None:
    # The impostor comes first, so keeping either the first or the last entry would be caught.
    impostor = SigningKey(key_a.private_key, key_b.kid)
    jwks.extra_jwks = [impostor.jwk(), key_b.jwk()]
    await invalid(verifier.verify_token(jwks.mint(key=key_b)), "unknown_key")
    assert (await verifier.verify_token(jwks.mint(key=key_a))).user_id == "user_alice"


async def test_stale_on_error_serves_the_last_good_set(
    verifier: TokenVerifier, jwks: JwksServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    await verifier.start()
    jwks.status = 503
    clock.advance(301)  # past the TTL: the next verification refreshes, and that fails

    assert (await verifier.verify_token(jwks.mint())).user_id == "user_alice"
    assert jwks.fetches == 2
    assert "serving the last good key set" in caplog.text
    assert verifier.ready

    clock.advance(86_400)  # past jwks_max_stale_s
    await expect(verifier.verify_token(jwks.mint()), "UNAVAILABLE", "JWKS_UNAVAILABLE")
    assert not verifier.ready


async def test_stale_refresh_retries_after_the_cooldown_and_recovers(
    verifier: TokenVerifier, jwks: JwksServer, clock: FakeClock
) -> None:
    await verifier.start()
    jwks.status = 503
    clock.advance(301)
    await verifier.verify_token(jwks.mint())
    clock.advance(10)
    await verifier.verify_token(jwks.mint())
    assert jwks.fetches == 2  # a failing issuer is not asked again within the cooldown
    jwks.status = 200
    clock.advance(20)
    await verifier.verify_token(jwks.mint())
    assert jwks.fetches == 3


async def test_jwks_down_and_unknown_kid_is_unavailable(
    verifier: TokenVerifier, jwks: JwksServer, clock: FakeClock, key_a: SigningKey
) -> None:
    await verifier.start()
    known = jwks.mint()
    ghost = jwks.mint(key=SigningKey(key_a.private_key, "ghost"))
    await jwks.close()  # connection refused from now on
    clock.advance(31)

    err = await expect(verifier.verify_token(ghost), "UNAVAILABLE", "JWKS_UNAVAILABLE")
    assert isinstance(err, Unavailable)
    assert err.retry_after == 30.0  # the next fetch is allowed after the cooldown
    clock.advance(10)
    # Within the cooldown the outcome stays "unknown", not "invalid": the kid may exist.
    err = await expect(verifier.verify_token(ghost), "UNAVAILABLE", "JWKS_UNAVAILABLE")
    assert isinstance(err, Unavailable)
    assert err.retry_after == 20.0
    assert (await verifier.verify_token(known)).user_id == "user_alice"


async def test_jwks_never_reached_is_unavailable_and_retried_soon(
    verifier: TokenVerifier, jwks: JwksServer, clock: FakeClock
) -> None:
    jwks.status = 500
    await verifier.start()  # logged, not raised
    assert not verifier.ready
    await expect(verifier.verify_token(jwks.mint()), "UNAVAILABLE", "JWKS_UNAVAILABLE")
    assert jwks.fetches == 1
    jwks.status = 200
    clock.advance(1)
    assert (await verifier.verify_token(jwks.mint())).user_id == "user_alice"
    assert jwks.fetches == 2


async def test_oversized_jwks_is_refused(
    verifier: TokenVerifier, jwks: JwksServer, clock: FakeClock
) -> None:
    jwks.extra_jwks = [{"kty": "oct", "kid": "filler", "k": "A" * (1 << 20)}]
    await expect(verifier.verify_token(jwks.mint()), "UNAVAILABLE", "JWKS_UNAVAILABLE")
    jwks.extra_jwks = [{"kty": "oct", "kid": "filler", "k": "A" * 1000}]
    clock.advance(1)
    assert (await verifier.verify_token(jwks.mint())).user_id == "user_alice"
    assert jwks.fetches == 2


async def test_redirects_are_not_followed(verifier: TokenVerifier, jwks: JwksServer) -> None:
    jwks.redirect_to = "/elsewhere.json"
    await expect(verifier.verify_token(jwks.mint()), "UNAVAILABLE", "JWKS_UNAVAILABLE")
    assert jwks.fetches == 1


async def test_slow_jwks_times_out_as_unavailable(
    make_verifier: MakeVerifier, jwks: JwksServer
) -> None:
    jwks.delay_s = 5.0
    verifier = make_verifier(timeout=0.2)
    started = time.monotonic()
    await expect(verifier.verify_token(jwks.mint()), "UNAVAILABLE", "JWKS_UNAVAILABLE")
    assert time.monotonic() - started < 2.0


async def test_public_key_pem_verifies_without_network(
    make_verifier: MakeVerifier, jwks: JwksServer, key_a: SigningKey, key_b: SigningKey
) -> None:
    verifier = make_verifier(public_key_pem=key_a.public_pem())
    await verifier.start()
    assert verifier.ready
    assert (await verifier.verify_token(jwks.mint())).user_id == "user_alice"
    await invalid(verifier.verify_token(jwks.mint(key=key_b)), "signature")
    assert jwks.fetches == 0
    escaped = make_verifier(public_key_pem=key_a.public_pem().replace("\n", "\\n"))
    assert (await escaped.verify_token(jwks.mint())).user_id == "user_alice"


# --- construction ---


def test_weak_public_key_pem_is_refused(weak_key: SigningKey) -> None:
    with pytest.raises(ValueError, match="2048"):
        TokenVerifier(
            AuthSettings(public_key_pem=weak_key.public_pem()), issuer="https://i", jwks_url=""
        )


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/.well-known/jwks.json",
        "http://10.0.0.1/jwks.json",
        "ftp://127.0.0.1/jwks.json",
        "file:///etc/passwd",
        "https:///jwks.json",
    ],
)
def test_jwks_url_must_be_https_unless_loopback(url: str) -> None:
    with pytest.raises(ValueError, match="https"):
        TokenVerifier(AuthSettings(), issuer="https://i", jwks_url=url)


@pytest.mark.parametrize(
    "url",
    [
        "https://clerk.example.com/.well-known/jwks.json",
        "http://127.0.0.1:1/jwks.json",
        "http://127.8.9.10/jwks.json",
        "http://localhost:8080/jwks.json",
        "http://[::1]:8080/jwks.json",
    ],
)
def test_accepted_jwks_urls(url: str) -> None:
    TokenVerifier(AuthSettings(), issuer="https://i", jwks_url=url)


def test_jwks_url_defaults_to_the_issuer_well_known() -> None:
    TokenVerifier(AuthSettings(), issuer="https://clerk.example.com", jwks_url="")
    with pytest.raises(ValueError, match="https"):
        TokenVerifier(AuthSettings(), issuer="http://clerk.example.com", jwks_url="")


def test_clerk_mode_needs_authorized_parties() -> None:
    url = "https://clerk.example.com/.well-known/jwks.json"
    with pytest.raises(ValueError, match="authorized_parties"):
        TokenVerifier(AuthSettings(mode="clerk"), issuer="https://i", jwks_url=url)
    TokenVerifier(AuthSettings(mode="clerk", allow_any_azp=True), issuer="https://i", jwks_url=url)
    TokenVerifier(
        AuthSettings(mode="clerk", authorized_parties=[APP]), issuer="https://i", jwks_url=url
    )


@pytest.mark.parametrize(
    ("settings", "issuer"),
    [(AuthSettings(subject_pattern="("), "https://i"), (AuthSettings(), "")],
)
def test_bad_configuration_is_refused(settings: AuthSettings, issuer: str) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        TokenVerifier(settings, issuer=issuer, jwks_url="https://i/jwks.json")


def test_pyjwt_version_floor() -> None:
    check_pyjwt_version()
    check_pyjwt_version("2.15.0")
    check_pyjwt_version("3.0.0")
    for old in ("2.14.9", "2.9.0", "1.7.1", "garbage"):
        with pytest.raises(RuntimeError, match=r"2\.15"):
            check_pyjwt_version(old)


# --- embedded issuer ---


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def test_embedded_keys_persist_across_restarts(data_dir: Path) -> None:
    first = EmbeddedIssuer.load_or_create(data_dir, "http://127.0.0.1:1")
    second = EmbeddedIssuer.load_or_create(data_dir, "http://127.0.0.1:1")

    assert first.kid == second.kid
    assert first.jwks() == second.jwks()
    private = data_dir / "keys" / "jwt_signing_key.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE((data_dir / "keys").stat().st_mode) == 0o700
    public = (data_dir / "keys" / "jwt_signing_key.pub.pem").read_text()
    assert public == first.public_key_pem()
    assert not [p for p in (data_dir / "keys").iterdir() if p.name.startswith(".")]


def test_embedded_jwks_document(data_dir: Path) -> None:
    issuer = EmbeddedIssuer.load_or_create(data_dir, "http://127.0.0.1:1")
    (jwk,) = issuer.jwks()["keys"]
    assert set(jwk) == {"kty", "use", "alg", "kid", "n", "e"}
    assert (jwk["kty"], jwk["use"], jwk["alg"], jwk["kid"]) == ("RSA", "sig", "RS256", issuer.kid)
    assert "d" not in jwk
    assert len(issuer.kid) == 43  # a base64url SHA-256 thumbprint


async def test_embedded_mint_verifies_over_http(data_dir: Path) -> None:
    async with JwksServer([]) as server:
        issuer = EmbeddedIssuer.load_or_create(data_dir, server.issuer)
        server.extra_jwks = issuer.jwks()["keys"]
        verifier = TokenVerifier(AuthSettings(), issuer=server.issuer, jwks_url=server.url)
        try:
            await verifier.start()
            now = time.time()
            token = issuer.mint(
                "user_dev", ttl_s=3600, now=now, name="Dev", email="d@example.com", azp=APP
            )
            principal = await verifier.verify_token(token)
            again = await verifier.verify_authorization(bearer(issuer.mint("user_dev", ttl_s=60)))
        finally:
            await verifier.close()
    assert principal.user_id == "user_dev"
    assert principal.issuer == server.issuer
    assert principal.session_id.startswith("sess_")
    assert principal.session_id != again.session_id
    assert principal.expires_at == float(int(now) + 3600)
    assert (principal.display_name, principal.email) == ("Dev", "d@example.com")
    assert server.fetches == 1


async def test_embedded_token_from_another_install_is_refused(
    data_dir: Path, tmp_path: Path
) -> None:
    async with JwksServer([]) as server:
        ours = EmbeddedIssuer.load_or_create(data_dir, server.issuer)
        theirs = EmbeddedIssuer.load_or_create(tmp_path / "other", server.issuer)
        server.extra_jwks = ours.jwks()["keys"]
        verifier = TokenVerifier(AuthSettings(), issuer=server.issuer, jwks_url=server.url)
        try:
            await invalid(verifier.verify_token(theirs.mint("user_dev", ttl_s=60)), "unknown_key")
            expired = ours.mint("user_dev", ttl_s=60, now=time.time() - 3600)
            await expect(verifier.verify_token(expired), "UNAUTHENTICATED", "TOKEN_EXPIRED")
        finally:
            await verifier.close()


async def test_embedded_token_for_another_issuer_url_names_the_issuer(data_dir: Path) -> None:
    """Same data directory, other port settings: the key is known, the issuer is not."""
    async with JwksServer([]) as server:
        ours = EmbeddedIssuer.load_or_create(data_dir, server.issuer)
        other_port = EmbeddedIssuer.load_or_create(data_dir, "http://127.0.0.1:8081")
        server.extra_jwks = ours.jwks()["keys"]
        verifier = TokenVerifier(AuthSettings(), issuer=server.issuer, jwks_url=server.url)
        try:
            err = await invalid(verifier.verify_token(other_port.mint("alice", ttl_s=60)), "issuer")
        finally:
            await verifier.close()
    assert err.message == "invalid token: issuer not accepted"


def test_embedded_mint_rejects_bad_arguments(data_dir: Path) -> None:
    issuer = EmbeddedIssuer.load_or_create(data_dir, "http://127.0.0.1:1")
    with pytest.raises(ValueError, match="ttl"):
        issuer.mint("user_x", ttl_s=0)
    with pytest.raises(ValueError, match="user_id"):
        issuer.mint("", ttl_s=60)
