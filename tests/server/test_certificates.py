"""Federation PKI: CA and SuperLink certificate (checked by our verifier and by a real TLS
handshake), key file modes, no overwrite, the CA key kept encrypted or elsewhere, and the
coordinator's `flwr` connection."""

from __future__ import annotations

import shutil
import socket
import ssl
import stat
import threading
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedrad.server.certificates import (
    CA_CERT,
    CA_KEY,
    DEFAULT_CA_DAYS,
    DEFAULT_CONTROL_ADDRESS,
    DEFAULT_SERVER_DAYS,
    FLWR_CONNECTION,
    SERVER_CERT,
    SERVER_KEY,
    PkiError,
    build_ca,
    ca_key_is_encrypted,
    certificate_hosts,
    check_federation,
    describe_federation,
    flwr_home,
    init_federation,
    issue_server_certificate,
    load_ca_key,
    load_certificate,
    parse_hosts,
    read_passphrase_file,
    renew_server_certificate,
    split_address,
    verify_certificate,
    verify_server_certificate,
    write_flwr_connection,
)
from fedrad.server.site_registry import add_site, list_sites
from tests.server.coordinator_support import site_key

HOSTS = ["coord.example.org", "10.0.0.5", "*.fed.example.org", "2001:db8::7"]


# -- certificates ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fed") / "coordinator"
    init_federation(directory, hosts=HOSTS)
    return directory


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "127.0.0.1",
        "coord.example.org",
        "COORD.example.org.",
        "coord.example.org:8000",
        "10.0.0.5",
        "10.0.0.5:9092",
        "2001:db8::7",
        "[2001:db8::7]:8000",
        "a.fed.example.org",
    ],
)
def test_server_certificate_verifies_for_every_name_it_covers(federation: Path, host: str) -> None:
    assert verify_server_certificate(federation / SERVER_CERT, federation / CA_CERT, host) == []


@pytest.mark.parametrize(
    "host", ["other.example.org", "10.0.0.6", "fed.example.org", "a.b.fed.example.org", "::1"]
)
def test_server_certificate_does_not_cover_another_host(federation: Path, host: str) -> None:
    problems = verify_server_certificate(federation / SERVER_CERT, federation / CA_CERT, host)
    assert len(problems) == 1
    assert problems[0].startswith(f"does not cover host {host}")
    assert "coord.example.org" in problems[0]  # says what it does cover


def test_certificate_extensions(federation: Path) -> None:
    ca = load_certificate(federation / CA_CERT)
    cert = load_certificate(federation / SERVER_CERT)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp384r1"
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days == DEFAULT_CA_DAYS
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == DEFAULT_SERVER_DAYS
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert certificate_hosts(cert) == [
        "localhost",
        "coord.example.org",
        "*.fed.example.org",
        "127.0.0.1",
        "10.0.0.5",
        "2001:db8::7",
    ]


def _handshake(directory: Path, server_hostname: str, ca_file: Path) -> None:
    """A real TLS 1.2+ handshake in memory, Python's ssl (OpenSSL) on both ends."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(directory / SERVER_CERT, directory / SERVER_KEY)
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    client_ctx.verify_flags |= getattr(ssl, "VERIFY_X509_STRICT", 0)
    left, right = socket.socketpair()
    with left, right:
        left.settimeout(10)
        right.settimeout(10)
        server = server_ctx.wrap_socket(left, server_side=True, do_handshake_on_connect=False)
        client = client_ctx.wrap_socket(
            right, server_hostname=server_hostname, do_handshake_on_connect=False
        )
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                server.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                errors.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            client.do_handshake()
        finally:
            client.close()
            thread.join(10)
            server.close()
        assert errors == []


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "coord.example.org", "10.0.0.5"])
def test_real_tls_client_accepts_the_superlink(federation: Path, name: str) -> None:
    _handshake(federation, name, federation / CA_CERT)


def test_real_tls_client_refuses_wrong_host_and_wrong_ca(federation: Path, tmp_path: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        _handshake(federation, "other.example.org", federation / CA_CERT)
    other = tmp_path / "other"
    init_federation(other)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(federation, "localhost", other / CA_CERT)


def test_certificate_from_another_ca_is_not_signed_by_this_ca(federation: Path) -> None:
    ca = load_certificate(federation / CA_CERT)
    hosts = parse_hosts(["coord.example.org"])
    same_name_ca, same_name_key = build_ca()  # a second federation with the default name
    cert, _ = issue_server_certificate(same_name_ca, same_name_key, hosts)
    problems = verify_certificate(cert, ca, "coord.example.org")
    assert problems == ["not signed by this CA (the signature does not verify with its key)"]
    named_ca, named_key = build_ca(name="Evil Corp")
    cert, _ = issue_server_certificate(named_ca, named_key, hosts)
    (problem,) = verify_certificate(cert, ca, "coord.example.org")
    assert problem.startswith("not signed by this CA (issued by CN=Evil Corp CA")


def test_expired_and_not_yet_valid_certificates_are_reported(federation: Path) -> None:
    ca = load_certificate(federation / CA_CERT)
    ca_key = serialization.load_pem_private_key((federation / CA_KEY).read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    hosts = parse_hosts([])
    now = datetime.now(UTC)
    expired, _ = issue_server_certificate(
        ca, ca_key, hosts, days=3, not_before=now - timedelta(days=30)
    )
    (problem,) = verify_certificate(expired, ca, "localhost")
    end = expired.not_valid_after_utc
    assert problem == f"certificate expired on {end:%Y-%m-%d %H:%M} UTC"
    future, _ = issue_server_certificate(ca, ca_key, hosts, not_before=now + timedelta(days=2))
    (problem,) = verify_certificate(future, ca, "localhost")
    assert problem.startswith("certificate is not valid before ")
    # the same good certificate, seen from two years on: it and (with 5 years) not the CA
    later = verify_server_certificate(
        federation / SERVER_CERT, federation / CA_CERT, "localhost", now=now + timedelta(days=730)
    )
    assert len(later) == 1 and later[0].startswith("certificate expired on")
    much_later = verify_server_certificate(
        federation / SERVER_CERT, federation / CA_CERT, now=now + timedelta(days=3000)
    )
    assert any(p.startswith("CA certificate expired on") for p in much_later)


def test_a_server_certificate_cannot_outlive_its_ca() -> None:
    ca, key = build_ca(days=30)
    with pytest.raises(PkiError, match="outlive the CA"):
        issue_server_certificate(ca, key, parse_hosts([]), days=31)


def test_unreadable_files_are_one_problem(tmp_path: Path, federation: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate")
    assert verify_server_certificate(tmp_path / "junk.pem", federation / CA_CERT, "x") == [
        f"certificate {tmp_path / 'junk.pem'} is not a PEM certificate"
    ]
    (problem,) = verify_server_certificate(federation / SERVER_CERT, tmp_path / "nope.pem")
    assert problem == f"CA certificate {tmp_path / 'nope.pem'} does not exist"


def test_rsa_federation(tmp_path: Path) -> None:
    summary = init_federation(tmp_path / "rsa", hosts=["coord"], algorithm="rsa-3072")
    cert = load_certificate(tmp_path / "rsa" / SERVER_CERT)
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)
    assert cert.public_key().key_size == 3072
    assert check_federation(tmp_path / "rsa", ["coord"]) == []
    assert summary.server_hosts == ["localhost", "coord", "127.0.0.1"]
    _handshake(tmp_path / "rsa", "coord", tmp_path / "rsa" / CA_CERT)


# -- files -------------------------------------------------------------------------------------


def test_key_files_are_0600_and_init_never_overwrites(tmp_path: Path) -> None:
    directory = tmp_path / "coord"
    summary = init_federation(directory, hosts=["coord.example.org"])
    assert _mode(directory) == 0o700
    assert _mode(directory / CA_KEY) == 0o600
    assert _mode(directory / SERVER_KEY) == 0o600
    assert _mode(directory / CA_CERT) == 0o644
    assert summary.ca_certificate == str(directory / CA_CERT)
    assert summary.private_keys == [str(directory / CA_KEY), str(directory / SERVER_KEY)]
    before = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    with pytest.raises(PkiError, match="already exists"):
        init_federation(directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()} == before
    # a stray key alone is enough to refuse
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / CA_KEY).write_text("precious")
    with pytest.raises(PkiError, match="already exists"):
        init_federation(lone)
    assert (lone / CA_KEY).read_text() == "precious"
    assert check_federation(directory, ["coord.example.org"]) == []


def test_bad_input_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="bind-all"):
        init_federation(tmp_path / "a", hosts=["0.0.0.0"])
    with pytest.raises(PkiError, match="without a port"):
        init_federation(tmp_path / "b", hosts=["coord.example.org:8000"])
    with pytest.raises(PkiError, match="outlive"):
        init_federation(tmp_path / "c", ca_days=10, server_days=20)
    assert list(tmp_path.iterdir()) == []


def test_renew_server_certificate_keeps_the_ca(tmp_path: Path) -> None:
    directory = tmp_path / "coord"
    init_federation(directory, hosts=["old.example.org"])
    ca_before = (directory / CA_CERT).read_bytes()
    key_before = (directory / SERVER_KEY).read_bytes()
    summary = renew_server_certificate(directory, hosts=["new.example.org", "192.0.2.1"], days=90)
    assert (directory / CA_CERT).read_bytes() == ca_before
    assert (directory / SERVER_KEY).read_bytes() != key_before
    assert _mode(directory / SERVER_KEY) == 0o600
    assert summary.server_hosts == ["localhost", "new.example.org", "127.0.0.1", "192.0.2.1"]
    assert check_federation(directory, ["new.example.org", "192.0.2.1"]) == []
    assert check_federation(directory, ["old.example.org"])[0].startswith("does not cover")
    assert not list(directory.glob(".*.tmp"))


def test_check_federation_finds_a_foreign_key_and_loose_modes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    init_federation(a)
    init_federation(b)
    shutil.copyfile(b / SERVER_KEY, a / SERVER_KEY)  # copyfile keeps a's mode (0600)
    assert check_federation(a) == [f"{SERVER_KEY} does not belong to {SERVER_CERT}"]
    (a / CA_KEY).chmod(0o644)
    assert check_federation(a)[-1] == f"{a / CA_KEY} is readable by others (mode 644); chmod 600"
    with pytest.raises(PkiError, match="not a coordinator directory"):
        check_federation(tmp_path / "missing")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("coord", ("coord", None)),
        ("coord:8000", ("coord", 8000)),
        ("10.0.0.5:9092", ("10.0.0.5", 9092)),
        ("[::1]:8000", ("::1", 8000)),
        ("[::1]", ("::1", None)),
        ("2001:db8::7", ("2001:db8::7", None)),
    ],
)
def test_split_address(address: str, expected: tuple[str, int | None]) -> None:
    assert split_address(address) == expected


@pytest.mark.parametrize(
    "address",
    [
        "https://coord:8000",
        "coord:0",
        "coord:http",
        ":8000",
        "[::1",
        # taken as given (it is written to flwr's config.toml as it is): no whitespace
        "127.0.0.1:8000\n",
        " coord:8000",
        "coord: 8000",
        "coord:8000 ",
        "coord\t:8000",
        "coord:80\x00",
        # ASCII digits only: isdigit() takes these, int() takes the first or raises on the second
        "coord:\u0668\u0660",
        "coord:\u00b2",
    ],
)
def test_split_address_refuses(address: str) -> None:
    with pytest.raises(PkiError):
        split_address(address)


def test_an_address_with_a_newline_is_not_written_for_flwr(tmp_path: Path) -> None:
    """The control address goes into flwr's config.toml as given: one that `$` or strip()
    would have let through with a newline is refused before anything is made."""
    with pytest.raises(PkiError, match="no spaces, newlines"):
        init_federation(tmp_path / "coord", control_address="127.0.0.1:8000\n")
    assert not (tmp_path / "coord").exists()
    with pytest.raises(PkiError, match="no spaces, newlines"):
        write_flwr_connection(tmp_path, address="127.0.0.1:8000\n")
    assert not (tmp_path / "flwr").exists()


def test_parse_hosts() -> None:
    hosts = parse_hosts(["Coord.Example.org", "coord.example.org", "10.0.0.5", "[::1]"])
    assert hosts.dns == ("localhost", "coord.example.org")
    assert [str(ip) for ip in hosts.ips] == ["127.0.0.1", "10.0.0.5", "::1"]
    assert parse_hosts(["x"], include_loopback=False).names() == ["x"]
    for bad in (
        "bad_host!",
        "-x.org",
        "*.org",
        "a..b",
        "höst.example",
        "::",
        "coord\n.example.org",
    ):
        with pytest.raises(PkiError):
            parse_hosts([bad])
    with pytest.raises(PkiError, match="at least one"):
        parse_hosts([], include_loopback=False)


# -- the CA key: encrypted, or kept off this host -----------------------------------------------


def test_encrypted_ca_key_signs_only_with_its_passphrase(tmp_path: Path) -> None:
    directory = tmp_path / "coord"
    init_federation(directory, hosts=["old.example.org"], ca_passphrase=b"correct horse")
    path = directory / CA_KEY
    assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert _mode(path) == 0o600
    assert ca_key_is_encrypted(directory) is True
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(path.read_bytes(), password=None)
    # the SuperLink key stays unencrypted: flower-superlink loads it without a passphrase
    serialization.load_pem_private_key((directory / SERVER_KEY).read_bytes(), password=None)
    before = (directory / SERVER_CERT).read_bytes()
    with pytest.raises(PkiError) as missing:
        renew_server_certificate(directory, hosts=["new.example.org"])
    assert str(missing.value) == (
        f"the CA key {path} is encrypted: give its passphrase "
        "(--ca-passphrase-file FILE or FEDRAD_CA_PASSPHRASE)"
    )
    with pytest.raises(PkiError) as wrong:
        renew_server_certificate(directory, hosts=["new.example.org"], ca_passphrase=b"nope")
    assert str(wrong.value) == f"wrong passphrase for the CA key {path}"
    assert (directory / SERVER_CERT).read_bytes() == before
    renew_server_certificate(directory, hosts=["new.example.org"], ca_passphrase=b"correct horse")
    assert check_federation(directory, ["new.example.org"]) == []
    ca = load_certificate(directory / CA_CERT)
    assert load_ca_key(directory, b"correct horse").public_key() == ca.public_key()


def test_a_passphrase_for_an_unencrypted_ca_key_is_refused(coordinator: Path) -> None:
    assert ca_key_is_encrypted(coordinator) is False
    with pytest.raises(PkiError, match=r"ca\.key is not encrypted"):
        renew_server_certificate(coordinator, ca_passphrase=b"secret")


def test_an_empty_ca_passphrase_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="must not be empty"):
        init_federation(tmp_path / "coord", ca_passphrase=b"")
    assert not (tmp_path / "coord").exists()


@pytest.mark.parametrize("kept", ["encrypted", "elsewhere"])
def test_only_renewal_needs_the_ca_key(tmp_path: Path, kept: str) -> None:
    directory = tmp_path / "coord"
    init_federation(directory, hosts=["coord.example.org"], ca_passphrase=b"pw")
    if kept == "elsewhere":
        (directory / CA_KEY).rename(tmp_path / "offline-ca.key")
        assert ca_key_is_encrypted(directory) is None
        with pytest.raises(PkiError) as absent:
            renew_server_certificate(directory, ca_passphrase=b"pw")
        assert str(absent.value) == (
            f"the CA key {directory / CA_KEY} is not on this host: "
            "run renew-cert where the CA key is kept"
        )
        assert describe_federation(directory).private_keys == [str(directory / SERVER_KEY)]
    assert check_federation(directory, ["coord.example.org"]) == []
    assert add_site(directory, "site-a", site_key(tmp_path, "site-a")).new
    assert [s.site_id for s in list_sites(directory)] == ["site-a"]


def test_read_passphrase_file(tmp_path: Path) -> None:
    path = tmp_path / "pass"
    path.write_bytes(b"two words \r\nsecond line\n")
    assert read_passphrase_file(path) == b"two words "
    path.write_bytes(b"\nlater")
    with pytest.raises(PkiError, match="empty passphrase"):
        read_passphrase_file(path)
    with pytest.raises(PkiError, match="does not exist"):
        read_passphrase_file(tmp_path / "missing")


# -- the coordinator's flwr connection -----------------------------------------------------------


def test_init_writes_the_flwr_connection(coordinator: Path) -> None:
    home = flwr_home(coordinator)
    assert home == coordinator.resolve() / "flwr"
    config = tomllib.loads((home / "config.toml").read_text())
    assert config["superlink"]["default"] == FLWR_CONNECTION
    connection = config["superlink"][FLWR_CONNECTION]
    assert connection == {
        "address": DEFAULT_CONTROL_ADDRESS,
        "root-certificates": str(coordinator.resolve() / CA_CERT),
    }
