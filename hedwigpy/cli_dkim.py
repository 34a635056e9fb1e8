"""`hedwigpy dkim generate`: a new DKIM key, its DNS TXT record, and (with `--config`) its config entry.

    hedwigpy dkim generate --domain D --selector S [--type rsa|ed25519] [--bits N] --out PATH
                           [--config FILE] [--force]

The private key is written as PKCS#8 PEM with mode 0600, never over an existing file unless `--force`.
The TXT record goes to stdout, ready to paste into the zone of D; RSA records are longer than one DNS
character-string may be (255 bytes), so they are printed as several quoted strings, which resolvers
join. `--config FILE` appends a `[[dkim.keys]]` table (rendered by tomli-w) to the file's text, so its
comments and layout stay as they were, after proving the result still loads.

Exit codes: 0 done; 1 an error (said on stderr, nothing written); 2 a usage error.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from ._config_parse import _selector
from ._units import parse_domain
from .config import ConfigError, parse_config
from .dkim import MIN_RSA_BITS, ascii_domain
from .storage._dirsync import write_all

DEFAULT_RSA_BITS = 2048
MAX_RSA_BITS = 4096
TXT_STRING = 255  # the most one DNS character-string holds (RFC 1035 3.3)

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class _Refused(Exception):
    """A reason to stop with exit code 1 before anything is written."""


def txt_record(domain: str, selector: str, key: PrivateKey) -> str:
    """`S._domainkey.D IN TXT "v=DKIM1; k=...; p=..."`, split into strings of at most 255 bytes."""
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        # RFC 8463 3: p= is the raw 32-byte public key, not an ASN.1 structure.
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        value = f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    else:
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        value = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    strings = " ".join(f'"{value[i : i + TXT_STRING]}"' for i in range(0, len(value), TXT_STRING))
    return f"{selector}._domainkey.{ascii_domain(domain)} IN TXT {strings}"


def generate_key(kind: str, bits: int) -> PrivateKey:
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _key_path_for_config(out: Path, config: Path) -> str:
    """`out` as the config file should name it: relative paths there are relative to its directory."""
    out_abs = Path(os.path.abspath(out))
    try:
        return str(out_abs.relative_to(Path(os.path.abspath(config)).parent))
    except ValueError:
        return str(out_abs)


def _config_with_key(config: Path, domain: str, selector: str, out: Path) -> str:
    """The config file's text with the new `[[dkim.keys]]` appended; raises _Refused when the file
    cannot be read or parsed, already has this selector for the domain, or would not load after."""
    try:
        text = config.read_bytes().decode("utf-8")
        data = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _Refused(f"{config}: cannot read it as TOML: {exc}") from None
    dkim = data.get("dkim", {})
    existing = dkim.get("keys", []) if isinstance(dkim, dict) else []
    for old in existing if isinstance(existing, list) else []:
        if (
            isinstance(old, dict)
            and str(old.get("domain", "")).lower().rstrip(".") == domain
            and old.get("selector") == selector
        ):
            raise _Refused(f"{config}: already has a key for selector {selector!r} of {domain}")
    entry: dict[str, Any] = {
        "domain": domain,
        "selector": selector,
        "private_key": _key_path_for_config(out, config),
    }
    separator = "" if not text or text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n"
    # tomli-w writes a lone array of tables inline (`keys = [{...}]`), which could not follow an existing
    # [[dkim.keys]]; the table header is ours, the values are quoted by tomli-w.
    new_text = text + separator + "[[dkim.keys]]\n" + tomli_w.dumps(entry)
    try:
        parse_config(tomllib.loads(new_text), Path(os.path.abspath(config)).parent, {})
    except tomllib.TOMLDecodeError as exc:
        raise _Refused(f"{config}: a [[dkim.keys]] table cannot be appended to it: {exc}") from None
    except ConfigError as exc:
        raise _Refused(f"{config}: would not load with the new key: " + "; ".join(exc.errors)) from None
    return new_text


def _write_atomically(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then move it into place: replacing
    what is there, or (not `replace`) failing with FileExistsError if anything is."""
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask says
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic and never overwrites
    finally:
        if not replace or tmp.exists():
            tmp.unlink(missing_ok=True)


def _usage(message: str) -> int:
    print(f"hedwigpy dkim generate: error: {message}", file=sys.stderr)
    return 2


def _cmd_generate(args: argparse.Namespace) -> int:
    try:
        domain = parse_domain(args.domain)
        selector = _selector(args.selector)
    except ValueError as exc:
        return _usage(str(exc))
    if args.type == "ed25519" and args.bits is not None:
        return _usage("--bits is for RSA keys (Ed25519 keys have one size)")
    bits = DEFAULT_RSA_BITS if args.bits is None else args.bits
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        return _usage(f"--bits must be between {MIN_RSA_BITS} and {MAX_RSA_BITS} (got {bits})")
    out: Path = args.out
    try:
        if out.exists() and not args.force:
            raise _Refused(f"{out} exists; give --force to replace it")
        if not out.parent.is_dir():
            raise _Refused(f"{out.parent} is not a directory")
        new_config = None if args.config is None else _config_with_key(args.config, domain, selector, out)
    except _Refused as exc:
        print(f"hedwigpy dkim generate: {exc}", file=sys.stderr)
        return 1
    key = generate_key(args.type, bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        _write_atomically(out, pem, 0o600, replace=args.force)
    except FileExistsError:
        print(f"hedwigpy dkim generate: {out} exists; give --force to replace it", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"hedwigpy dkim generate: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    what = "Ed25519 key" if args.type == "ed25519" else f"RSA-{bits} key"
    print(f"wrote the {what} for {selector}._domainkey.{domain} to {out} (mode 0600)", file=sys.stderr)
    if new_config is not None:
        try:
            target = args.config.resolve()  # a symlinked config stays a symlink: its target is updated
            mode = target.stat().st_mode & 0o7777
            _write_atomically(target, new_config.encode("utf-8"), mode, replace=True)
        except OSError as exc:
            print(f"hedwigpy dkim generate: cannot update {args.config}: {exc}", file=sys.stderr)
            return 1
        print(f"added it to {args.config} as a [[dkim.keys]] entry", file=sys.stderr)
    print("publish this DNS record:", file=sys.stderr)
    print(txt_record(domain, selector, key))
    return 0


def add_dkim_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`dkim generate` (INTERFACE.md, CLI)."""
    dkim = subparsers.add_parser("dkim", help="DKIM signing keys")
    dkim_sub = dkim.add_subparsers(dest="dkim_command", required=True, metavar="COMMAND")
    gen = dkim_sub.add_parser(
        "generate", help="write a new private key and print its DNS TXT record", description=__doc__
    )
    gen.formatter_class = argparse.RawDescriptionHelpFormatter
    gen.add_argument("--domain", required=True, help="the signing domain (d=)")
    gen.add_argument("--selector", required=True, help="the selector (s=): S._domainkey.D holds the key")
    gen.add_argument("--type", choices=("rsa", "ed25519"), default="rsa", help="default rsa")
    gen.add_argument("--bits", type=int, help=f"RSA key size, {MIN_RSA_BITS}-{MAX_RSA_BITS} (default 2048)")
    gen.add_argument("--out", type=Path, required=True, help="where to write the private key (PEM)")
    gen.add_argument("--config", type=Path, help="also add the key to this config file")
    gen.add_argument("--force", action="store_true", help="replace an existing key file")
    gen.set_defaults(func=_cmd_generate)
