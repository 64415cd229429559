"""Federation PKI on the coordinator: the federation CA, the SuperLink's TLS certificate, and the
registry of the sites' public node keys. Framework-free: `cryptography` only.

A coordinator directory holds:

- `ca.pem` (the federation CA certificate: the one file every site gets), `ca.key` (0600);
- `superlink.pem` + `superlink.key` (0600): the SuperLink's TLS certificate and key, signed by the
  CA, naming every host name and IP address sites use to reach it;
- `sites.toml`: site id -> OpenSSH ECDSA public node key, its SHA-256 fingerprint, date added,
  and a copy of each key as `site_keys/<site_id>.pub` for Flower's CLI;
- `flwr/config.toml`: a Flower CLI connection (`FLWR_HOME`) to the local SuperLink.

How a registered key reaches Flower 1.41 (read from its source): `flower-superlink` has no key
file; `--auth-list-public-keys` is refused. With `--enable-supernode-auth` it admits only keys in
its LinkState, added through the Control API by `flwr supernode register KEY.pub CONNECTION`,
where CONNECTION names `[superlink.<name>]` (address, root-certificates) in
`$FLWR_HOME/config.toml`.
The LinkState is in memory unless `flower-superlink --database FILE` is given.

Private keys are created 0600 with O_EXCL and never overwritten (the SuperLink key is replaced only
by `renew_server_certificate`, atomically); nothing here copies a private key anywhere.

The CA key may be kept encrypted with a passphrase (PKCS#8, `init_federation(ca_passphrase=...)`)
or moved off the SuperLink host altogether: only `renew_server_certificate` reads it, so code on
the coordinator host cannot mint certificates without it. Starting, checking and registering
sites need `ca.pem` and the SuperLink's own key only.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

import tomli_w
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedrad.common.atomic_file import replace_file
from fedrad.common.protocol.messages import SITE_ID_PATTERN

KeyAlgorithm = Literal["ec-p384", "rsa-3072"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CA_CERT: Final[str] = "ca.pem"
CA_KEY: Final[str] = "ca.key"
SERVER_CERT: Final[str] = "superlink.pem"
SERVER_KEY: Final[str] = "superlink.key"
SITES_FILE: Final[str] = "sites.toml"
SITE_KEYS_DIR: Final[str] = "site_keys"
FLWR_HOME_DIR: Final[str] = "flwr"
CA_PASSPHRASE_ENV: Final[str] = "FEDRAD_CA_PASSPHRASE"  # where the CLI also looks for it
FLWR_CONNECTION: Final[str] = "fedrad"  # the connection name in $FLWR_HOME/config.toml
# flower-superlink serves Fleet, Control and Runtime APIs on one HTTPS --host/--port (uvicorn);
# 8000 is its default port. The coordinator's own CLI reaches it over loopback.
DEFAULT_CONTROL_ADDRESS: Final[str] = "127.0.0.1:8000"
DEFAULT_CA_DAYS: Final[int] = 1826  # five years
DEFAULT_SERVER_DAYS: Final[int] = 365
LOOPBACK_HOSTS: Final[tuple[str, ...]] = ("localhost", "127.0.0.1")
CLOCK_SKEW: Final[timedelta] = timedelta(minutes=5)  # certificates start this much in the past
NODE_KEY_CURVES: Final[dict[str, str]] = {
    "secp256r1": "P-256",
    "secp384r1": "P-384",
    "secp521r1": "P-521",
}
_MAX_PUBKEY_BYTES: Final[int] = 16_384
_DNS_LABEL: Final[re.Pattern[str]] = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class PkiError(Exception):
    """The PKI operation cannot go ahead; the message says why in one line."""


# -- host names and addresses ------------------------------------------------------------------


def split_address(address: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]:port` or a bare IPv6 address -> (host, port or None)."""
    text = address.strip()
    if "://" in text or "/" in text:
        raise PkiError(f"{address!r}: give a host name or IP address, not a URL")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else None
        if not sep or (rest and port_text is None):
            raise PkiError(f"{address!r} is not [IPv6]:PORT")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, None
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise PkiError(f"{address!r}: port must be a number from 1 to 65535")
        port = int(port_text)
    if not host:
        raise PkiError(f"{address!r} has no host")
    return host, port


@dataclass(frozen=True)
class Hosts:
    """The names a certificate covers, as DNS names and IP addresses."""

    dns: tuple[str, ...]
    ips: tuple[IPAddress, ...]

    def names(self) -> list[str]:
        return [*self.dns, *(str(ip) for ip in self.ips)]


def parse_hosts(hosts: Iterable[str], *, include_loopback: bool = True) -> Hosts:
    """Validates host names and IPs (no ports, URLs or bind-all addresses) and tells them apart."""
    dns: list[str] = []
    ips: list[IPAddress] = []
    given = [*(LOOPBACK_HOSTS if include_loopback else ()), *hosts]
    for raw in given:
        text = raw.strip()
        try:
            ip = ipaddress.ip_address(text.strip("[]"))
        except ValueError:
            ip = None
        if ip is not None:
            if ip.is_unspecified:
                raise PkiError(
                    f"{text} is a bind-all address, not one sites connect to: "
                    "give the host name or IP address sites will use"
                )
            if ip not in ips:
                ips.append(ip)
            continue
        host, port = split_address(text)
        if port is not None:
            raise PkiError(f"{raw!r}: give host names without a port")
        name = host.lower().rstrip(".")
        labels = name.split(".")
        if (
            not name.isascii()
            or len(name) > 253
            or not all(_DNS_LABEL.match(label) for label in labels[1:])
            or not (_DNS_LABEL.match(labels[0]) or (labels[0] == "*" and len(labels) > 2))
        ):
            raise PkiError(f"{raw!r} is not a valid host name or IP address")
        if name not in dns:
            dns.append(name)
    if not dns and not ips:
        raise PkiError("the certificate must cover at least one host name or IP address")
    return Hosts(dns=tuple(dns), ips=tuple(ips))


# -- building certificates ---------------------------------------------------------------------


def _new_key(algorithm: KeyAlgorithm) -> PrivateKey:
    if algorithm == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm == "rsa-3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise PkiError(f"unknown key algorithm {algorithm!r} (use ec-p384 or rsa-3072)")


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm:
    return hashes.SHA384() if isinstance(key, ec.EllipticCurvePrivateKey) else hashes.SHA256()


def build_ca(
    *,
    name: str = "fedrad federation",
    days: int = DEFAULT_CA_DAYS,
    algorithm: KeyAlgorithm = "ec-p384",
    not_before: datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A self-signed federation CA that may sign end-entity certificates only (path length 0)."""
    if days < 1:
        raise PkiError(f"CA validity must be at least one day, got {days}")
    key = _new_key(algorithm)
    start = (not_before or datetime.now(UTC)) - CLOCK_SKEW
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _hash_for(key))
    )
    return cert, key


def issue_server_certificate(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    hosts: Hosts,
    *,
    days: int = DEFAULT_SERVER_DAYS,
    algorithm: KeyAlgorithm = "ec-p384",
    not_before: datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A TLS server certificate for the SuperLink naming every host in `hosts`, signed by the CA."""
    if days < 1:
        raise PkiError(f"certificate validity must be at least one day, got {days}")
    start = (not_before or datetime.now(UTC)) - CLOCK_SKEW
    end = start + timedelta(days=days)
    if end > ca_cert.not_valid_after_utc:
        raise PkiError(
            f"a {days}-day certificate would outlive the CA (valid until "
            f"{_day(ca_cert.not_valid_after_utc)}): use fewer days"
        )
    key = _new_key(algorithm)
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    common = next((n for n in hosts.dns if n not in LOOPBACK_HOSTS), None) or hosts.names()[0]
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in hosts.dns]
    san += [x509.IPAddress(ip) for ip in hosts.ips]
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    *ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME),
                    x509.NameAttribute(NameOID.COMMON_NAME, common),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(ca_key, _hash_for(ca_key))
    )
    return cert, key


# -- files -------------------------------------------------------------------------------------


def _key_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM; unencrypted unless a passphrase is given (the SuperLink key never is:
    flower-superlink / uvicorn load it without one)."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if passphrase is None
        else serialization.BestAvailableEncryption(passphrase)
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Creates `path` with `mode`; refuses to replace anything already there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, mode)  # the umask may have narrowed it; never widen a private key


def load_certificate(path: Path, what: str = "certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError as exc:
        raise PkiError(f"{what} {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise PkiError(f"{what} {path} is a directory, not a PEM file") from exc
    except ValueError as exc:
        raise PkiError(f"{what} {path} is not a PEM certificate") from exc


def _load_private_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PkiError(f"private key {path} does not exist") from exc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(f"{path} holds a {type(key).__name__}, expected an EC or RSA key")
    return key


def _is_encrypted_pem(data: bytes) -> bool:
    return b"ENCRYPTED PRIVATE KEY" in data or b"Proc-Type: 4,ENCRYPTED" in data


def ca_key_is_encrypted(directory: Path) -> bool | None:
    """Whether `DIR/ca.key` is passphrase-protected; None when it is not on this host."""
    try:
        return _is_encrypted_pem((Path(directory) / CA_KEY).read_bytes())
    except (FileNotFoundError, IsADirectoryError):
        return None


def load_ca_key(directory: Path, ca_passphrase: bytes | None = None) -> PrivateKey:
    """The federation CA's private key, decrypted with `ca_passphrase` when it is kept encrypted.
    Only certificate issuing needs it, so it may be absent from the SuperLink host."""
    path = Path(directory) / CA_KEY
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise PkiError(
            f"the CA key {path} is not on this host: run renew-cert where the CA key is kept"
        ) from exc
    encrypted = _is_encrypted_pem(data)
    if encrypted and ca_passphrase is None:
        raise PkiError(
            f"the CA key {path} is encrypted: give its passphrase "
            f"(--ca-passphrase-file FILE or {CA_PASSPHRASE_ENV})"
        )
    if not encrypted and ca_passphrase is not None:
        raise PkiError(
            f"the CA key {path} is not encrypted: give no passphrase "
            f"(unset {CA_PASSPHRASE_ENV}, drop --ca-passphrase-file)"
        )
    try:
        key = serialization.load_pem_private_key(data, password=ca_passphrase)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        if encrypted:
            raise PkiError(f"wrong passphrase for the CA key {path}") from exc
        raise PkiError(f"{path} is not a PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(f"{path} holds a {type(key).__name__}, expected an EC or RSA key")
    return key


def read_passphrase_file(path: Path) -> bytes:
    """The first line of `path` (trailing newline stripped) as a passphrase: a file keeps it out
    of the process list and the shell history."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise PkiError(f"passphrase file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise PkiError(f"passphrase file {path} is a directory") from exc
    passphrase = data.split(b"\n", 1)[0].removesuffix(b"\r")
    if not passphrase:
        raise PkiError(f"passphrase file {path} holds an empty passphrase on its first line")
    return passphrase


def _day(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, colon-separated hex (what `openssl x509 -fingerprint
    -sha256` prints): sites compare it out of band before trusting `ca.pem`."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def certificate_hosts(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        *san.get_values_for_type(x509.DNSName),
        *map(str, san.get_values_for_type(x509.IPAddress)),
    ]


@dataclass(frozen=True)
class FederationSummary:
    """What a coordinator directory holds, for the CLI to show."""

    directory: str
    ca_certificate: str  # the one file every site gets
    ca_fingerprint: str  # SHA-256, compared out of band by each site
    ca_expires: str
    server_certificate: str
    server_key: str
    server_hosts: list[str]
    server_expires: str
    private_keys: list[str]  # 0600, those on this host (ca.key may be kept elsewhere)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_federation(directory: Path) -> FederationSummary:
    directory = Path(directory)
    ca = load_certificate(directory / CA_CERT, "CA certificate")
    server = load_certificate(directory / SERVER_CERT, "SuperLink certificate")
    return FederationSummary(
        directory=str(directory),
        ca_certificate=str(directory / CA_CERT),
        ca_fingerprint=certificate_fingerprint(ca),
        ca_expires=_day(ca.not_valid_after_utc),
        server_certificate=str(directory / SERVER_CERT),
        server_key=str(directory / SERVER_KEY),
        server_hosts=certificate_hosts(server),
        server_expires=_day(server.not_valid_after_utc),
        private_keys=[str(directory / n) for n in (CA_KEY, SERVER_KEY) if (directory / n).exists()],
    )


def init_federation(
    directory: Path,
    *,
    hosts: Iterable[str] = (),
    include_loopback: bool = True,
    ca_days: int = DEFAULT_CA_DAYS,
    server_days: int = DEFAULT_SERVER_DAYS,
    algorithm: KeyAlgorithm = "ec-p384",
    name: str = "fedrad federation",
    control_address: str = DEFAULT_CONTROL_ADDRESS,
    ca_passphrase: bytes | None = None,
) -> FederationSummary:
    """Creates the federation CA and the SuperLink certificate in `directory`. Everything is
    validated and built in memory first; an existing CA or key is never replaced. With
    `ca_passphrase`, `ca.key` is written encrypted (PKCS#8) so it cannot sign without it."""
    directory = Path(directory)
    for existing in (CA_KEY, CA_CERT, SERVER_KEY, SERVER_CERT):
        if (directory / existing).exists():
            raise PkiError(
                f"{directory / existing} already exists: a federation CA is created once"
            )
    if directory.exists() and not directory.is_dir():
        raise PkiError(f"{directory} exists and is not a directory")
    if not name.strip():
        raise PkiError("the federation name must not be empty")
    parsed = parse_hosts(hosts, include_loopback=include_loopback)
    split_address(control_address)
    if ca_passphrase is not None and not ca_passphrase:
        raise PkiError("the CA key passphrase must not be empty")
    ca_cert, ca_key = build_ca(name=name, days=ca_days, algorithm=algorithm)
    cert, key = issue_server_certificate(
        ca_cert, ca_key, parsed, days=server_days, algorithm=algorithm
    )
    if not directory.exists():
        directory.mkdir(parents=True)
        os.chmod(directory, 0o700)
    _write_new(directory / CA_KEY, _key_pem(ca_key, ca_passphrase), 0o600)
    _write_new(directory / CA_CERT, _cert_pem(ca_cert), 0o644)
    _write_new(directory / SERVER_KEY, _key_pem(key), 0o600)
    _write_new(directory / SERVER_CERT, _cert_pem(cert), 0o644)
    write_flwr_connection(directory, address=control_address)
    return describe_federation(directory)


def renew_server_certificate(
    directory: Path,
    *,
    hosts: Iterable[str] = (),
    include_loopback: bool = True,
    days: int = DEFAULT_SERVER_DAYS,
    ca_passphrase: bytes | None = None,
) -> FederationSummary:
    """A new SuperLink key and certificate (new host list, same CA); the old pair is replaced
    atomically. Sites need nothing new: their `ca.pem` still verifies it. The only operation that
    needs the CA key (`ca_passphrase` when it is encrypted); nothing is written if it fails."""
    directory = Path(directory)
    ca_cert = load_certificate(directory / CA_CERT, "CA certificate")
    ca_key = load_ca_key(directory, ca_passphrase)
    if ca_key.public_key() != ca_cert.public_key():
        raise PkiError(f"{directory / CA_KEY} does not belong to {directory / CA_CERT}")
    algorithm: KeyAlgorithm = "rsa-3072" if isinstance(ca_key, rsa.RSAPrivateKey) else "ec-p384"
    parsed = parse_hosts(hosts, include_loopback=include_loopback)
    cert, key = issue_server_certificate(ca_cert, ca_key, parsed, days=days, algorithm=algorithm)
    replace_file(directory / SERVER_KEY, _key_pem(key), mode=0o600)
    replace_file(directory / SERVER_CERT, _cert_pem(cert), mode=0o644)
    return describe_federation(directory)


# -- verification ------------------------------------------------------------------------------


def _covers(cert: x509.Certificate, host: str) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        return ip in san.get_values_for_type(x509.IPAddress)
    name = host.lower().rstrip(".")
    for pattern in (p.lower().rstrip(".") for p in san.get_values_for_type(x509.DNSName)):
        if pattern == name:
            return True
        head, _, tail = name.partition(".")
        if pattern.startswith("*.") and head and tail == pattern[2:]:
            return True
    return False


def verify_certificate(
    cert: x509.Certificate,
    ca: x509.Certificate,
    host: str | None = None,
    *,
    now: datetime | None = None,
) -> list[str]:
    """Every reason a TLS client trusting only `ca` would refuse `cert` for `host` (`host`,
    `host:port` or an IP; None checks chain and dates only), one line each; [] when it is fine."""
    now = now or datetime.now(UTC)
    problems: list[str] = []
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        problems.append("the CA file does not hold a CA certificate")
    if now > ca.not_valid_after_utc:
        problems.append(f"CA certificate expired on {_day(ca.not_valid_after_utc)}")
    try:
        cert.verify_directly_issued_by(ca)
    except ValueError:  # the issuer named in the certificate is not this CA
        problems.append(
            f"not signed by this CA (issued by {cert.issuer.rfc4514_string()}, "
            f"this CA is {ca.subject.rfc4514_string()})"
        )
    except (TypeError, InvalidSignature):  # same name, another key: a different federation
        problems.append("not signed by this CA (the signature does not verify with its key)")
    if now > cert.not_valid_after_utc:
        problems.append(f"certificate expired on {_day(cert.not_valid_after_utc)}")
    if now < cert.not_valid_before_utc:
        problems.append(f"certificate is not valid before {_day(cert.not_valid_before_utc)}")
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.SERVER_AUTH not in usages:
            problems.append("certificate is not for TLS servers (no serverAuth usage)")
    except x509.ExtensionNotFound:
        pass  # no restriction: any usage
    if host is not None:
        try:
            name, _ = split_address(host)
        except PkiError as exc:
            return [*problems, str(exc)]
        if not _covers(cert, name):
            covered = ", ".join(certificate_hosts(cert)) or "nothing"
            problems.append(f"does not cover host {name} (covers {covered})")
    return problems


def verify_server_certificate(
    cert_path: Path, ca_path: Path, host: str | None = None, *, now: datetime | None = None
) -> list[str]:
    """`verify_certificate` on PEM files; an unreadable file is itself the one problem."""
    try:
        ca = load_certificate(Path(ca_path), "CA certificate")
        cert = load_certificate(Path(cert_path), "certificate")
    except PkiError as exc:
        return [str(exc)]
    return verify_certificate(cert, ca, host, now=now)


def check_federation(
    directory: Path, hosts: Iterable[str] = (), *, now: datetime | None = None
) -> list[str]:
    """Problems with a coordinator directory's SuperLink certificate and key, for each host
    (none given: chain, dates and key only). Raises PkiError when the files are not there."""
    directory = Path(directory)
    if not (directory / CA_CERT).is_file():
        raise PkiError(f"{directory} is not a coordinator directory (no {CA_CERT}; run init)")
    ca = load_certificate(directory / CA_CERT, "CA certificate")
    cert = load_certificate(directory / SERVER_CERT, "SuperLink certificate")
    key = _load_private_key(directory / SERVER_KEY)
    problems: list[str] = []
    for host in list(hosts) or [None]:
        problems += [p for p in verify_certificate(cert, ca, host, now=now) if p not in problems]
    if key.public_key() != cert.public_key():
        problems.append(f"{SERVER_KEY} does not belong to {SERVER_CERT}")
    for name in (CA_KEY, SERVER_KEY):
        path = directory / name
        if path.exists() and path.stat().st_mode & 0o077:
            problems.append(
                f"{path} is readable by others (mode {path.stat().st_mode & 0o777:o}); chmod 600"
            )
    return problems


# -- site registry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteRecord:
    site_id: str
    public_key: str  # "ecdsa-sha2-nistp384 AAAA..." (OpenSSH, comment dropped)
    fingerprint: str  # "SHA256:..." as `ssh-keygen -l` prints it
    curve: str  # P-256, P-384 or P-521
    added: str  # ISO 8601, UTC

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Registration:
    record: SiteRecord
    new: bool  # False: this site was already registered with this very key


def ssh_fingerprint(openssh_line: str) -> str:
    blob = base64.b64decode(openssh_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def read_site_public_key(path: Path) -> tuple[str, str]:
    """(OpenSSH line, curve name) of a site's node key, checked the way `flwr supernode
    register` checks it (ECDSA on a NIST curve); a private key file is refused unread-further."""
    path = Path(path)
    if not path.is_file():
        raise PkiError(f"no such file: {path}" if not path.exists() else f"{path} is not a file")
    if path.stat().st_size > _MAX_PUBKEY_BYTES:
        raise PkiError(f"{path} is too large to be an OpenSSH public key")
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        raise PkiError(
            f"{path} is a private key: send only the public half (keys/node_key.pub); "
            "a private key never leaves its site"
        )
    if b"BEGIN PUBLIC KEY" in data:
        raise PkiError(
            f"{path} is a PEM public key (the ledger key?): Flower needs the site's OpenSSH "
            "node key, keys/node_key.pub"
        )
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError(
            f"{path} is not an OpenSSH public key (expected one line 'ecdsa-sha2-nistp384 AAAA...')"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        kind = "Ed25519" if isinstance(key, ed25519.Ed25519PublicKey) else type(key).__name__
        kind = "RSA" if isinstance(key, rsa.RSAPublicKey) else kind.removesuffix("PublicKey")
        raise PkiError(
            f"{path} is an {kind} key: Flower node authentication needs ECDSA on a NIST curve "
            "(P-256, P-384, P-521), the site's keys/node_key.pub"
        )
    if key.curve.name not in NODE_KEY_CURVES:
        raise PkiError(f"{path}: curve {key.curve.name} is not P-256, P-384 or P-521")
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line.decode("ascii"), NODE_KEY_CURVES[key.curve.name]


def list_sites(directory: Path) -> list[SiteRecord]:
    path = Path(directory) / SITES_FILE
    if not path.exists():
        return []
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        return [SiteRecord(site_id=sid, **fields) for sid, fields in raw.get("sites", {}).items()]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, TypeError) as exc:
        raise PkiError(f"{path} is not a readable site registry ({exc!s:.80})") from exc


def add_site(
    directory: Path, site_id: str, pubkey_path: Path, *, now: datetime | None = None
) -> Registration:
    """Registers a site's public node key in `sites.toml` and copies it to `site_keys/`. The same
    id with the same key is a no-op; a new key for a known id, or a known key under a second id,
    is refused (re-keying a site is a deliberate removal first)."""
    directory = Path(directory)
    if not (directory / CA_CERT).is_file():
        raise PkiError(
            f"{directory} is not a coordinator directory (no {CA_CERT}; run fedrad-coordinator "
            "init first)"
        )
    if not SITE_ID_PATTERN.match(site_id):
        raise PkiError(f"site id {site_id!r}: use letters, digits, '_', '.', '-' (max 64)")
    line, curve = read_site_public_key(pubkey_path)
    fingerprint = ssh_fingerprint(line)
    sites = {record.site_id: record for record in list_sites(directory)}
    known = sites.get(site_id)
    if known is not None:
        if known.fingerprint == fingerprint:
            return Registration(record=known, new=False)
        raise PkiError(
            f"site {site_id} is already registered with another key ({known.fingerprint})"
        )
    for other in sites.values():
        if other.fingerprint == fingerprint:
            raise PkiError(f"this key is already registered for site {other.site_id}")
    record = SiteRecord(
        site_id=site_id,
        public_key=line,
        fingerprint=fingerprint,
        curve=curve,
        added=(now or datetime.now(UTC)).isoformat(timespec="seconds"),
    )
    sites[site_id] = record
    keys = directory / SITE_KEYS_DIR
    keys.mkdir(exist_ok=True)
    replace_file(keys / f"{site_id}.pub", (line + "\n").encode("ascii"), mode=0o644)
    table = {
        sid: {k: v for k, v in r.as_dict().items() if k != "site_id"} for sid, r in sites.items()
    }
    replace_file(
        directory / SITES_FILE,
        (
            "# fedrad site registry: public node keys only (written by fedrad-coordinator).\n"
            + tomli_w.dumps({"sites": table})
        ).encode("utf-8"),
        mode=0o644,
    )
    return Registration(record=record, new=True)


# -- Flower 1.41 wiring ------------------------------------------------------------------------


def write_flwr_connection(directory: Path, *, address: str = DEFAULT_CONTROL_ADDRESS) -> Path:
    """Writes `DIR/flwr/config.toml` with one connection, FLWR_CONNECTION, to the SuperLink at
    `address` over TLS verified by `ca.pem`; returns the FLWR_HOME to run `flwr` with."""
    split_address(address)
    home = Path(directory).resolve() / FLWR_HOME_DIR
    home.mkdir(mode=0o700, exist_ok=True)
    config = {
        "superlink": {
            "default": FLWR_CONNECTION,
            FLWR_CONNECTION: {
                "address": address,
                "root-certificates": str(Path(directory).resolve() / CA_CERT),
            },
        }
    }
    replace_file(home / "config.toml", tomli_w.dumps(config).encode("utf-8"), mode=0o600)
    return home


def flwr_environment(directory: Path) -> dict[str, str]:
    """The environment `flwr_register_command` runs in (added to the caller's own)."""
    return {"FLWR_HOME": str(Path(directory).resolve() / FLWR_HOME_DIR)}


def flwr_register_command(directory: Path, site_id: str, *, flwr: str = "flwr") -> list[str]:
    """The Flower 1.41 command that admits a registered site's key to the running SuperLink
    (Control API RegisterNode); run it with `flwr_environment(directory)`."""
    key = Path(directory).resolve() / SITE_KEYS_DIR / f"{site_id}.pub"
    return [
        flwr,
        "supernode",
        "register",
        str(key),
        FLWR_CONNECTION,
        "--name",
        site_id,
        "--format",
        "json",
    ]


def superlink_tls_args(directory: Path) -> list[str]:
    """`flower-superlink` flags for TLS with this directory's files and node authentication."""
    directory = Path(directory).resolve()
    return [
        "--ssl-ca-certfile",
        str(directory / CA_CERT),
        "--ssl-certfile",
        str(directory / SERVER_CERT),
        "--ssl-keyfile",
        str(directory / SERVER_KEY),
        "--enable-supernode-auth",
    ]
