"""The coordinator's Fleet proxy: the nginx config that passes `POST /v1/fleet/` to the
loopback SuperLink over verified TLS and answers everything else 403, written 0600; finding
nginx; and, where nginx is installed, `nginx -t` on the generated config."""

from __future__ import annotations

import re
import shutil
import socket
import stat
from pathlib import Path

import pytest

from fedrad.server import fleet_proxy
from fedrad.server.certificates import CA_CERT, SERVER_CERT, SERVER_KEY, init_federation
from fedrad.server.fleet_proxy import (
    CONFIG_FILE,
    INSTALL_HINT,
    PROXY_DIR,
    ProxyError,
    check_config,
    find_nginx,
    nginx_command,
    nginx_config,
    write_config,
)
from fedrad.server.superlink import proxy_tls_name


def _config(directory: Path, host: str = "0.0.0.0", port: int = 9092, **over: object) -> str:
    settings: dict[str, object] = dict(
        host=host,
        port=port,
        upstream_port=9093,
        upstream_name="localhost",
        certificate=directory / SERVER_CERT,
        key=directory / SERVER_KEY,
        ca=directory / CA_CERT,
    )
    settings.update(over)
    return nginx_config(directory, **settings)  # type: ignore[arg-type]


def _blocks(text: str, opener: str) -> list[str]:
    """The bodies of every `opener { ... }` block (nested braces followed)."""
    bodies = []
    for match in re.finditer(re.escape(opener) + r"\s*\{", text):
        depth, start = 1, match.end()
        index = start
        while depth:
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            index += 1
        bodies.append(text[start : index - 1])
    return bodies


def _size(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", value).groups()  # type: ignore[union-attr]
    return int(number) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit.lower()]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# -- the config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "listen"),
    [
        ("0.0.0.0", "listen 9092 ssl;"),
        ("", "listen 9092 ssl;"),
        ("127.0.0.1", "listen 127.0.0.1:9092 ssl;"),
        ("10.0.0.5", "listen 10.0.0.5:9092 ssl;"),
        ("::", "listen [::]:9092 ipv6only=off ssl;"),
        ("::1", "listen [::1]:9092 ssl;"),
    ],
)
def test_the_proxy_listens_where_the_sites_reach_it(tmp_path: Path, host: str, listen: str) -> None:
    text = _config(tmp_path, host=host)
    listens = [line.strip() for line in text.splitlines() if line.strip().startswith("listen ")]
    assert listens == [listen]


def test_only_post_to_the_fleet_api_is_proxied(tmp_path: Path) -> None:
    text = _config(tmp_path)
    assert text.count("proxy_pass") == 1
    assert text.count("location ") == 2
    fleet = _blocks(text, "location /v1/fleet/")
    assert len(fleet) == 1
    assert "proxy_pass https://127.0.0.1:9093;" in fleet[0]
    assert _blocks(fleet[0], "limit_except POST") == [" deny all; "]
    default = _blocks(text, "location /")
    assert [body.strip() for body in default] == ["return 403;"]
    server = _blocks(text, "server")
    assert len(server) == 1
    # no other route to the SuperLink: no Control or Runtime API path, no other upstream
    assert "127.0.0.1:9093" not in text.replace("proxy_pass https://127.0.0.1:9093;", "")


def test_the_upstream_is_verified_against_the_federation_ca(tmp_path: Path) -> None:
    text = _config(tmp_path, upstream_name="coord.example.org")
    fleet = _blocks(text, "location /v1/fleet/")[0]
    assert "proxy_ssl_verify on;" in fleet
    assert f"proxy_ssl_trusted_certificate {tmp_path / CA_CERT};" in fleet
    assert "proxy_ssl_name coord.example.org;" in fleet
    assert "proxy_pass https://" in fleet  # TLS to the SuperLink too, not plain HTTP
    assert f"ssl_certificate {tmp_path / SERVER_CERT};" in text
    assert f"ssl_certificate_key {tmp_path / SERVER_KEY};" in text
    protocols = re.search(r"ssl_protocols ([^;]+);", text)
    assert protocols is not None and set(protocols.group(1).split()) <= {"TLSv1.2", "TLSv1.3"}


def test_flower_s_message_chunks_fit_through(tmp_path: Path) -> None:
    """Flower sends arrays in 5 MiB chunks; nginx's 1 MiB default would answer 413."""
    text = _config(tmp_path)
    sizes = re.findall(r"client_max_body_size (\S+);", text)
    assert len(sizes) == 1 and _size(sizes[0]) >= _size("6m")


def test_the_access_log_records_no_headers(tmp_path: Path) -> None:
    """Node authentication signs a timestamp in request headers: never written down."""
    text = _config(tmp_path)
    formats = [line for line in text.splitlines() if "log_format" in line]
    assert len(formats) == 1
    assert "$http_" not in formats[0] and "$request_body" not in formats[0]
    assert "$request_method" in formats[0] and "$status" in formats[0]
    logs = [line.strip() for line in text.splitlines() if line.strip().startswith("access_log")]
    assert logs and all(line.endswith(" fleet;") for line in logs)  # never nginx's "combined"
    assert "$http_" not in text


def test_every_path_nginx_writes_is_under_the_proxy_folder(tmp_path: Path) -> None:
    text = _config(tmp_path)
    proxy = tmp_path.resolve() / PROXY_DIR
    written = re.findall(r"(?:pid|error_log|access_log|_temp_path) (\S+?)[;\s]", text)
    assert len(written) >= 8
    assert all(Path(path).is_relative_to(proxy) for path in written), written
    assert "daemon off;" in text


def test_write_config_is_0600_in_a_0700_folder(tmp_path: Path) -> None:
    text = _config(tmp_path)
    path = write_config(tmp_path, text)
    assert path == tmp_path.resolve() / PROXY_DIR / CONFIG_FILE
    assert path.read_text() == text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert (path.parent / "tmp").is_dir()
    again = write_config(tmp_path, text.replace("9093", "9099"))  # rewritten at every start
    assert again == path and "9099" in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_nginx_command_runs_in_the_foreground_from_the_proxy_folder(tmp_path: Path) -> None:
    config = tmp_path / PROXY_DIR / CONFIG_FILE
    proxy = config.parent
    assert nginx_command("/usr/sbin/nginx", config) == [
        "/usr/sbin/nginx",
        "-p",
        str(proxy),
        "-e",
        str(proxy / "error.log"),
        "-c",
        str(config),
    ]


# -- finding nginx -----------------------------------------------------------------------------


def test_find_nginx_names_the_install_command_when_there_is_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleet_proxy.shutil, "which", lambda name: None)
    empty = tmp_path / "sbin"
    empty.mkdir()
    (empty / "nginx").write_text("#!/bin/sh\n")  # present but not executable: not nginx
    (empty / "nginx").chmod(0o644)
    monkeypatch.setattr(fleet_proxy, "_SEARCH", (str(tmp_path / "nowhere"), str(empty)))
    with pytest.raises(ProxyError) as refused:
        find_nginx()
    message = str(refused.value)
    assert message.startswith("nginx not found")
    assert INSTALL_HINT in message and "apt-get install nginx" in message
    assert "\n" not in message


def test_find_nginx_looks_in_the_sbin_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleet_proxy.shutil, "which", lambda name: None)
    folder = tmp_path / "sbin"
    folder.mkdir()
    (folder / "nginx").write_text("#!/bin/sh\n")
    (folder / "nginx").chmod(0o755)
    monkeypatch.setattr(fleet_proxy, "_SEARCH", (str(tmp_path / "nowhere"), str(folder)))
    assert find_nginx() == str(folder / "nginx")
    monkeypatch.setattr(fleet_proxy.shutil, "which", lambda name: "/opt/bin/nginx")
    assert find_nginx() == "/opt/bin/nginx"  # PATH first


def test_check_config_says_why_it_cannot_run_nginx(tmp_path: Path) -> None:
    path = write_config(tmp_path, _config(tmp_path))
    with pytest.raises(ProxyError, match="cannot run"):
        check_config(str(tmp_path / "no-nginx"), path)


# -- nginx itself ------------------------------------------------------------------------------

_NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)


@pytest.mark.skipif(_NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_nginx_accepts_the_generated_config_and_refuses_a_broken_one(tmp_path: Path) -> None:
    assert _NGINX is not None
    directory = tmp_path / "coord"
    init_federation(directory, hosts=["coord.example.org"])
    directory = directory.resolve()
    port, upstream = _free_ports(2)
    text = nginx_config(
        directory,
        host="127.0.0.1",
        port=port,
        upstream_port=upstream,
        upstream_name=proxy_tls_name(directory),
        certificate=directory / SERVER_CERT,
        key=directory / SERVER_KEY,
        ca=directory / CA_CERT,
    )
    path = write_config(directory, text)
    check_config(_NGINX, path)  # no exception: nginx -t accepts it

    missing_key = write_config(
        directory, text.replace(str(directory / SERVER_KEY), str(directory / "missing.key"))
    )
    with pytest.raises(ProxyError) as refused:
        check_config(_NGINX, missing_key)
    message = str(refused.value)
    assert message.startswith("nginx refused the proxy config: ")
    assert "missing.key" in message and "\n" not in message

    broken = write_config(directory, text.replace("limit_except POST", "limit_excep POST"))
    with pytest.raises(ProxyError, match="nginx refused the proxy config") as refused:
        check_config(_NGINX, broken)
    assert "\n" not in str(refused.value)
