"""`hedwigpy dkim generate` (issue 7): key files, the printed TXT record, the `--config` entry, exit codes."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from hedwigpy.cli import main
from hedwigpy.config import load_config
from hedwigpy.dkim import Signer

RECORD = re.compile(r'^(\S+) IN TXT ((?:"[^"]*" ?)+)$')
CONFIG_TEXT = '# the operator\'s notes\n[server]\nhostname = "mx.example.com"  # keep this comment\n'


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(["dkim", "generate", *map(str, argv)])
    out, err = capsys.readouterr()
    code = exited.value.code
    assert isinstance(code, int)
    return code, out, err


def record_of(out: str) -> tuple[str, list[str]]:
    """(owner name, character-strings) of the one TXT record printed on stdout."""
    match = RECORD.match(out.strip())
    assert match, out
    return match.group(1), re.findall(r'"([^"]*)"', match.group(2))


def public_key_from(strings: list[str]) -> bytes:
    tags = dict(t.strip().split("=", 1) for t in "".join(strings).split(";"))
    return base64.b64decode(tags["p"])


def test_rsa_key_and_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "rsa.pem"
    code, out, err = run(capsys, "--domain", "Example.COM", "--selector", "s2026", "--out", out_path)
    assert code == 0, err
    assert out_path.stat().st_mode & 0o777 == 0o600
    key = serialization.load_pem_private_key(out_path.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert out_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    name, strings = record_of(out)
    assert name == "s2026._domainkey.example.com"
    assert len(strings) == 2 and all(len(s.encode()) <= 255 for s in strings)
    assert "".join(strings).startswith("v=DKIM1; k=rsa; p=")
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public_key_from(strings) == der


def test_ed25519_key_and_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "ed.pem"
    args = ("--domain", "example.com", "--selector", "ed", "--type", "ed25519", "--out", out_path)
    code, out, _ = run(capsys, *args)
    assert code == 0
    key = serialization.load_pem_private_key(out_path.read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    name, strings = record_of(out)
    assert name == "ed._domainkey.example.com"
    assert strings[0].startswith("v=DKIM1; k=ed25519; p=") and len(strings) == 1
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert public_key_from(strings) == raw and len(raw) == 32


def test_bits_and_umask(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = os.umask(0)
    try:
        code, _, _ = run(
            capsys, "--domain", "a.example", "--selector", "s", "--bits", "1024", "--out", tmp_path / "k"
        )
    finally:
        os.umask(old)
    assert code == 0
    key = serialization.load_pem_private_key((tmp_path / "k").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 1024
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600


def test_never_overwrites_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "k.pem"
    out_path.write_bytes(b"precious")
    args = ("--domain", "example.com", "--selector", "s", "--type", "ed25519", "--out", out_path)
    code, out, err = run(capsys, *args)
    assert (code, out) == (1, "")
    assert "exists; give --force" in err
    assert out_path.read_bytes() == b"precious"
    code, _, _ = run(capsys, *args, "--force")
    assert code == 0
    assert out_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert out_path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pem"]  # no temporary file left


@pytest.mark.parametrize(
    "argv",
    [
        ("--domain", "example.com", "--selector", "s", "--bits", "512"),
        ("--domain", "example.com", "--selector", "s", "--bits", "8192"),
        ("--domain", "example.com", "--selector", "s", "--type", "ed25519", "--bits", "2048"),
        ("--domain", "example.com", "--selector", "bad selector"),
        ("--domain", "not a domain", "--selector", "s"),
        ("--domain", "example.com", "--selector", "s", "--type", "dsa"),
        ("--selector", "s"),
    ],
)
def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]) -> None:
    code, out, err = run(capsys, *argv, "--out", tmp_path / "k.pem")
    assert code == 2 and out == "" and "error" in err
    assert not (tmp_path / "k.pem").exists()


def test_config_gets_the_entry_and_keeps_everything_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "hedwig.toml"
    config.write_text(CONFIG_TEXT)
    (tmp_path / "keys").mkdir()
    inside, outside = tmp_path / "keys" / "rsa.pem", tmp_path.parent / f"{tmp_path.name}-ed.pem"
    code, _, err = run(
        capsys, "--domain", "example.com", "--selector", "r", "--out", inside, "--config", config
    )
    assert code == 0, err
    args = ("--domain", "example.com", "--selector", "e", "--type", "ed25519", "--out", outside)
    try:
        code, _, err = run(capsys, *args, "--config", config)
        assert code == 0, err
        text = config.read_text()
        assert text.startswith(CONFIG_TEXT)
        assert 'private_key = "keys/rsa.pem"' in text  # relative to the config file's directory
        assert f'private_key = "{outside}"' in text
        loaded = load_config(config)
        assert [(k.selector, k.private_key) for k in loaded.dkim.keys] == [("r", inside), ("e", outside)]
        signer = Signer.from_config(loaded.dkim)
        algorithms = [k.algorithm for k in signer.keys_for("example.com")]
        assert algorithms == [b"rsa-sha256", b"ed25519-sha256"]
    finally:
        outside.unlink(missing_ok=True)


def test_a_symlinked_config_stays_a_symlink(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Operators often link /etc/hedwigpy/hedwig.toml to a file kept elsewhere: the target is updated."""
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "hedwig.toml"
    target.write_text(CONFIG_TEXT)
    link = tmp_path / "hedwig.toml"
    link.symlink_to(target)
    out = tmp_path / "k.pem"
    code, _, err = run(capsys, "--domain", "example.com", "--selector", "s", "--out", out, "--config", link)
    assert code == 0, err
    assert link.is_symlink() and "[[dkim.keys]]" in target.read_text()


def test_config_from_another_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--out` relative to the working directory; the config names the same file relative to itself."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "keys").mkdir()
    config = tmp_path / "etc" / "hedwig.toml"
    config.write_text(CONFIG_TEXT)
    monkeypatch.chdir(tmp_path)
    code, _, _ = run(
        capsys, "--domain", "example.com", "--selector", "s", "--type", "ed25519",
        "--out", "etc/keys/s.pem", "--config", "etc/hedwig.toml",
    )  # fmt: skip
    assert code == 0
    assert load_config(config).dkim.keys[0].private_key == tmp_path / "etc" / "keys" / "s.pem"


@pytest.mark.parametrize(
    ("existing", "message"),
    [
        (
            '[[dkim.keys]]\ndomain = "Example.com"\nselector = "s"\nprivate_key = "x.pem"\n',
            "already has a key",
        ),
        (
            '[dkim]\nkeys = [{domain = "example.org", selector = "t", private_key = "x"}]\n',
            "cannot be appended",
        ),
        ("[server\n", "cannot read it as TOML"),
        ("[server]\nhostname = 5\n", "would not load with the new key: server.hostname"),
    ],
)
def test_config_refused_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], existing: str, message: str
) -> None:
    config = tmp_path / "hedwig.toml"
    config.write_text(existing)
    args = ("--domain", "example.com", "--selector", "s", "--type", "ed25519", "--out", tmp_path / "k.pem")
    code, out, err = run(capsys, *args, "--config", config)
    assert (code, out) == (1, "")
    assert message in err
    assert config.read_text() == existing
    assert not (tmp_path / "k.pem").exists()
