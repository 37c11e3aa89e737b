"""The checkpoint key comes from the environment, a file, or (with a warning) the internal key."""

from __future__ import annotations

import argparse
import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.audit import signing

INTERNAL = b"an-internal-key-of-some-length"


def _raw(key: Ed25519PrivateKey) -> str:
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(raw).decode()


def test_the_key_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    from_env = signing.load_signer({signing.KEY_ENV: _raw(key)}, INTERNAL)
    path = tmp_path / "audit.key"
    path.write_text(_raw(key) + "\n")
    from_file = signing.load_signer({signing.KEY_FILE_ENV: str(path)}, INTERNAL)

    expected = hashlib.sha256(signing.raw_public(key.public_key())).digest()[:16].hex()
    assert from_env.key_id == from_file.key_id == expected
    signature = from_env.sign(3, b"r" * 32, 1_790_000_000)
    assert signing.verify_note(from_file.public_key, 3, b"r" * 32, 1_790_000_000, signature)
    assert not signing.verify_note(from_file.public_key, 4, b"r" * 32, 1_790_000_000, signature)


def test_without_a_key_one_is_derived_from_the_internal_key_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = signing.load_signer({}, INTERNAL)
    assert signing.load_signer({}, INTERNAL).key_id == first.key_id
    assert signing.load_signer({}, INTERNAL + b"x").key_id != first.key_id
    assert "derived from ORCHESTRA_INTERNAL_KEY" in caplog.text


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({signing.KEY_ENV: "not base64!"}, "not base64"),
        ({signing.KEY_ENV: base64.b64encode(b"short").decode()}, "32 bytes"),
        ({signing.KEY_FILE_ENV: "/nonexistent/audit.key"}, "cannot read"),
    ],
)
def test_a_malformed_key_fails_fast(env: dict[str, str], message: str) -> None:
    with pytest.raises(signing.SigningKeyError, match=message):
        signing.load_signer(env, INTERNAL)


def test_the_note_is_the_documented_text() -> None:
    assert signing.note(8, bytes(32), 1_790_000_000) == (
        b"orchestra.dev/audit\n8\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n1790000000\n"
    )


def test_the_cli_prints_the_configured_public_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.cli.audit_cmd import run_public_key

    key = Ed25519PrivateKey.generate()
    monkeypatch.setenv(signing.KEY_ENV, _raw(key))
    assert run_public_key(argparse.Namespace()) == 0
    public, key_id = capsys.readouterr().out.split()
    assert base64.b64decode(public) == signing.raw_public(key.public_key())
    assert key_id == signing.key_id(key.public_key())
