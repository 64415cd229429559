"""The federation's PKI on the coordinator: the CA every site trusts, the SuperLink's TLS
certificate, and the connection of the coordinator's own `flwr` CLI, which trusts that CA.
Framework-free (`cryptography` only). Private keys are created 0600 and never overwritten, and
only `renew_server_certificate` reads the CA key: it may be kept encrypted, or off this host."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

import tomli_w
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedrad.common.atomic_file import replace_file

KeyAlgorithm = Literal["ec-p384", "rsa-3072"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CA_CERT: Final[str] = "ca.pem"  # the one file every site gets
CA_KEY: Final[str] = "ca.key"  # 0600; only renew-cert needs it
SERVER_CERT: Final[str] = "superlink.pem"
SERVER_KEY: Final[str] = "superlink.key"  # 0600, never leaves this host
FLWR_HOME_DIR: Final[str] = "flwr"  # FLWR_HOME of the coordinator's `flwr` CLI
CA_PASSPHRASE_ENV: Final[str] = "FEDRAD_CA_PASSPHRASE"  # where the CLI also looks for it
FLWR_CONNECTION: Final[str] = "fedrad"  # the connection name in $FLWR_HOME/config.toml
# flower-superlink serves Fleet, Control and Runtime APIs on one HTTPS --host/--port (uvicorn);
# 8000 is its default port. The coordinator's own CLI reaches it over loopback.
DEFAULT_CONTROL_ADDRESS: Final[str] = "127.0.0.1:8000"
DEFAULT_CA_DAYS: Final[int] = 1826  # five years
DEFAULT_SERVER_DAYS: Final[int] = 365
LOOPBACK_HOSTS: Final[tuple[str, ...]] = ("localhost", "127.0.0.1")
CLOCK_SKEW: Final[timedelta] = timedelta(minutes=5)  # certificates start this much in the past
_PORT: Final[re.Pattern[str]] = re.compile(r"[0-9]{1,5}")  # fullmatch
_DNS_LABEL: Final[re.Pattern[str]] = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")  # fullmatch, not $


class PkiError(Exception):
    """The PKI operation cannot go ahead; the message says why in one line."""


# -- host names and addresses ------------------------------------------------------------------


def _blank_or_control(text: str) -> bool:
    """Whether a host or address holds a space, a newline or a control character anywhere."""
    return not text.isprintable() or any(char.isspace() for char in text)


def split_address(address: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]:port` or a bare IPv6 address -> (host, port or None). Taken
    as it is, never stripped: callers pass the text itself on (flwr's config.toml), so a space,
    newline or control character anywhere in it is refused."""
    text = address
    if _blank_or_control(text):
        raise PkiError(
            f"{address[:70]!r}: an address holds no spaces, newlines or control characters"
        )
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
        # ASCII digits only: isdigit() and int() also take other scripts' digits ("٨٠")
        if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
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
        if _blank_or_control(text):  # "a b", "a\n.b"
            raise PkiError(f"{raw[:70]!r} is not a valid host name or IP address")
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
            or not all(_DNS_LABEL.fullmatch(label) for label in labels[1:])
            or not (_DNS_LABEL.fullmatch(labels[0]) or (labels[0] == "*" and len(labels) > 2))
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


# -- the coordinator's `flwr` CLI trusts this CA ------------------------------------------------


def flwr_home(directory: Path) -> Path:
    """FLWR_HOME of every Flower process the coordinator runs (its `flwr` CLI connection and
    the apps the SuperLink installs); their environment is `flower_process_env(flwr_home(DIR))`."""
    return Path(directory).resolve() / FLWR_HOME_DIR


def write_flwr_connection(directory: Path, *, address: str = DEFAULT_CONTROL_ADDRESS) -> Path:
    """Writes `DIR/flwr/config.toml` with one connection, FLWR_CONNECTION, to the SuperLink at
    `address` over TLS verified by `ca.pem`; returns the FLWR_HOME to run `flwr` with."""
    split_address(address)
    home = flwr_home(directory)
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
