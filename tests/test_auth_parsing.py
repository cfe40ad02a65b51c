"""Parsing what the caller sends: the bearer token, its hash, and the organization header.

Only the pure parsers; nothing here touches the cache or the database.
"""

from __future__ import annotations

import hashlib
import uuid

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.access.auth import MAX_TOKEN_LENGTH, bearer_token, hash_token, parse_organization_id
from gateway.errors import BadRequest, InvalidApiKey

ORG_ID = "0b9e4a5e-6a3c-4a8e-9a43-5f2a1f9c0d11"


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    """Request headers as aiohttp hands them over."""
    return CIMultiDictProxy(CIMultiDict(pairs))


class TestBearerToken:
    """`Authorization: Bearer <token>` and nothing else."""

    @pytest.mark.parametrize(
        ("pairs", "expected"),
        [
            pytest.param([("Authorization", "Bearer kilo_abc")], "kilo_abc", id="canonical"),
            pytest.param([("authorization", "Bearer kilo_abc")], "kilo_abc", id="header-lower"),
            pytest.param([("AUTHORIZATION", "Bearer kilo_abc")], "kilo_abc", id="header-upper"),
            pytest.param([("Authorization", "bearer tok")], "tok", id="scheme-lower"),
            pytest.param([("Authorization", "BEARER tok")], "tok", id="scheme-upper"),
            pytest.param([("Authorization", "bEaReR tok")], "tok", id="scheme-mixed"),
            pytest.param([("Authorization", "Bearer  tok ")], "tok", id="extra-spaces"),
            pytest.param(
                [("Authorization", "Bearer sk-or-v1-" + "a" * 64)],
                "sk-or-v1-" + "a" * 64,
                id="openrouter-style",
            ),
            pytest.param(
                [("Authorization", "Bearer " + "t" * MAX_TOKEN_LENGTH)],
                "t" * MAX_TOKEN_LENGTH,
                id="exactly-max-length",
            ),
        ],
    )
    def test_accepted(self, pairs: list[tuple[str, str]], expected: str):
        """A Bearer header, scheme in any case, yields the token without surrounding spaces."""
        assert bearer_token(headers(*pairs)) == expected

    @pytest.mark.parametrize(
        "pairs",
        [
            pytest.param([], id="missing"),
            pytest.param([("X-Api-Key", "kilo_abc")], id="other-header"),
            pytest.param([("Authorization", "")], id="empty"),
            pytest.param([("Authorization", " ")], id="space"),
            pytest.param([("Authorization", "Basic x")], id="basic"),
            pytest.param([("Authorization", "Basic dXNlcjpwYXNz")], id="basic-credentials"),
            pytest.param([("Authorization", "Token kilo_abc")], id="token-scheme"),
            pytest.param([("Authorization", "Bearer")], id="bearer-no-token"),
            pytest.param([("Authorization", "Bearer ")], id="bearer-space"),
            pytest.param([("Authorization", "Bearer    ")], id="bearer-spaces"),
            pytest.param([("Authorization", "kilo_abc")], id="bare-token"),
            pytest.param([("Authorization", "Bearerkilo_abc")], id="no-separator"),
            pytest.param([("Authorization", "Bearer\tkilo_abc")], id="tab-separator"),
            pytest.param(
                [("Authorization", "Bearer " + "t" * (MAX_TOKEN_LENGTH + 1))], id="one-too-long"
            ),
            pytest.param([("Authorization", "Bearer " + "t" * 10_000)], id="far-too-long"),
            pytest.param(
                [("Authorization", "Bearer first"), ("Authorization", "Bearer second")],
                id="two-headers",
            ),
        ],
    )
    def test_refused(self, pairs: list[tuple[str, str]]):
        """Anything but a Bearer token of at most 512 characters is a 401 invalid_api_key."""
        with pytest.raises(InvalidApiKey) as info:
            bearer_token(headers(*pairs))
        assert info.value.status == 401
        assert info.value.reason == "invalid_api_key"
        assert info.value.envelope()["error"]["code"] == 401
        assert info.value.envelope()["error_type"] == "invalid_api_key"

    def test_refusal_does_not_echo_token(self):
        """The 401 message never repeats what the caller sent."""
        secret = "kilo_" + "s" * (MAX_TOKEN_LENGTH + 1)
        with pytest.raises(InvalidApiKey) as info:
            bearer_token(headers(("Authorization", f"Bearer {secret}")))
        assert secret not in info.value.message
        assert secret.encode() not in info.value.body()

    def test_max_token_length(self):
        """Tokens are bounded at 512 characters."""
        assert MAX_TOKEN_LENGTH == 512


class TestHashToken:
    """Tokens are found by their SHA-256, never compared in clear."""

    @pytest.mark.parametrize(
        "token",
        ["kilo_abc", "", "a" * MAX_TOKEN_LENGTH, "sk-or-v1-0123456789abcdef", "clé-ünïcode-🔑"],
    )
    def test_is_sha256_hex(self, token: str):
        """hash_token is the lowercase hex SHA-256 of the token's UTF-8 bytes."""
        digest = hash_token(token)
        assert digest == hashlib.sha256(token.encode("utf-8")).hexdigest()
        assert digest == digest.lower()
        assert len(digest) == 64

    def test_known_vector(self):
        """The empty string hashes to SHA-256's published empty-input digest."""
        assert hash_token("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

    def test_different_tokens_differ(self):
        """Tokens that differ only in case hash differently."""
        assert hash_token("kilo_ABC") != hash_token("kilo_abc")


class TestParseOrganizationId:
    """The X-KiloCode-OrganizationId header is a UUID, canonicalised, or a 400."""

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            pytest.param(ORG_ID, ORG_ID, id="canonical"),
            pytest.param(ORG_ID.upper(), ORG_ID, id="upper-case"),
            pytest.param("0B9E4A5E-6a3c-4A8E-9a43-5F2A1F9C0D11", ORG_ID, id="mixed-case"),
            pytest.param(
                "00000000-0000-0000-0000-000000000000",
                "00000000-0000-0000-0000-000000000000",
                id="nil",
            ),
        ],
    )
    def test_canonicalises(self, value: str, expected: str):
        """A UUID in any case comes back lower-case with dashes."""
        assert parse_organization_id(value) == expected

    @pytest.mark.parametrize(
        "value",
        [
            pytest.param("'; DROP TABLE organizations; --", id="sql-drop"),
            pytest.param("1' OR '1'='1", id="sql-tautology"),
            pytest.param(f"{ORG_ID}' OR '1'='1", id="sql-after-uuid"),
            pytest.param(f"{ORG_ID};--", id="sql-comment-after-uuid"),
            pytest.param("", id="empty"),
            pytest.param(" ", id="space"),
            pytest.param("\t", id="tab"),
            pytest.param("-", id="dash"),
            pytest.param("----", id="dashes"),
            pytest.param("{}", id="braces"),
            pytest.param("null", id="null"),
            pytest.param("None", id="none"),
            pytest.param("undefined", id="undefined"),
            pytest.param("0", id="zero"),
            pytest.param("acme", id="slug"),
            pytest.param(ORG_ID[:-1], id="one-short"),
            pytest.param(ORG_ID + "0", id="one-long"),
            pytest.param(ORG_ID + ORG_ID, id="two-uuids"),
            pytest.param("x" * 10_000, id="very-long"),
            pytest.param(ORG_ID.replace("0", "g"), id="not-hex"),
            pytest.param(f"{ORG_ID},{ORG_ID}", id="list"),
            pytest.param("-" * 1_000 + ORG_ID, id="padded-with-dashes"),
            pytest.param(ORG_ID + "-" * 1_000, id="trailed-by-dashes"),
            pytest.param("-".join(ORG_ID.replace("-", "")), id="dash-between-every-digit"),
            pytest.param("+" + "1" * 31, id="int-style-plus-sign"),
            pytest.param("1_" * 15 + "11", id="int-style-underscores"),
        ],
    )
    def test_refused(self, value: str):
        """Anything that is not a UUID (SQL, blanks, wrong length) is a 400."""
        with pytest.raises(BadRequest) as info:
            parse_organization_id(value)
        assert info.value.status == 400
        assert info.value.reason == "invalid_organization_id"
        assert "X-KiloCode-OrganizationId" in info.value.message

    @pytest.mark.parametrize("version", [1, 3, 4, 5])
    def test_any_uuid_version(self, version: int):
        """Every UUID version is accepted; the id only has to be a well-formed UUID."""
        value = {
            1: uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8"),
            3: uuid.uuid3(uuid.NAMESPACE_DNS, "kilocode.ai"),
            4: uuid.UUID(ORG_ID),
            5: uuid.uuid5(uuid.NAMESPACE_DNS, "kilocode.ai"),
        }[version]
        assert parse_organization_id(str(value).upper()) == str(value)
