"""The sites' only door to the coordinator: an nginx TLS proxy that passes Flower's Fleet API
(`POST /v1/fleet/...`) to the loopback SuperLink and answers 403 to everything else before
Flower sees it, because the SuperLink's Control API, on the same listener, lets any caller
submit runs and register nodes. Access lines log method, path and status only: node
authentication signs a timestamp that must never be written down."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Final

from fedrad.common.atomic_file import replace_file

PROXY_DIR: Final[str] = "proxy"  # under the coordinator directory
CONFIG_FILE: Final[str] = "nginx.conf"
INSTALL_HINT: Final[str] = "apt-get install nginx-light (or: make proxy)"
# Flower sends arrays in 5 MiB chunks; nginx's 1 MiB default answers 413 and the reply is lost.
MAX_BODY: Final[str] = "16m"
_SEARCH: Final[tuple[str, ...]] = ("/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin")


class ProxyError(Exception):
    """The Fleet proxy cannot be set up or started; the message says why in one line."""


def find_nginx() -> str:
    """The nginx binary (PATH, then the usual sbin folders), or a one-line ProxyError."""
    found = shutil.which("nginx")
    if found is None:
        for folder in _SEARCH:
            candidate = Path(folder) / "nginx"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                found = str(candidate)
                break
    if found is None:
        raise ProxyError(
            "nginx not found: the coordinator's Fleet proxy needs it; install it with "
            + INSTALL_HINT
        )
    return found


def _listen(host: str, port: int) -> str:
    if host in ("", "0.0.0.0"):
        return str(port)
    if host == "::":
        return f"[::]:{port} ipv6only=off"  # every address, IPv4 too, like 0.0.0.0
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def nginx_config(
    directory: Path,
    *,
    host: str,
    port: int,
    upstream_port: int,
    upstream_name: str,
    certificate: Path,
    key: Path,
    ca: Path,
) -> str:
    """nginx.conf for the proxy: TLS on HOST:PORT with the SuperLink's certificate, POST
    /v1/fleet/ to https://127.0.0.1:UPSTREAM (verified as `upstream_name` by the CA), 403 for
    anything else. Bodies stay in memory (no temp files), logs go under DIR/proxy."""
    proxy = Path(directory).resolve() / PROXY_DIR
    return f"""# Written by fedrad-coordinator start (Fleet API only); rewritten at every start.
daemon off;
worker_processes 1;
pid {proxy / "nginx.pid"};
error_log {proxy / "error.log"} warn;
events {{ worker_connections 512; }}
http {{
    server_tokens off;
    log_format fleet '$remote_addr [$time_local] "$request_method $uri" $status $body_bytes_sent';
    access_log {proxy / "access.log"} fleet;
    client_body_temp_path {proxy / "tmp" / "body"};
    proxy_temp_path {proxy / "tmp" / "proxy"};
    fastcgi_temp_path {proxy / "tmp" / "fastcgi"};
    uwsgi_temp_path {proxy / "tmp" / "uwsgi"};
    scgi_temp_path {proxy / "tmp" / "scgi"};
    server {{
        listen {_listen(host, port)} ssl;
        ssl_certificate {certificate};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size {MAX_BODY};
        client_body_buffer_size {MAX_BODY};
        location /v1/fleet/ {{
            limit_except POST {{ deny all; }}
            proxy_pass https://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_name {upstream_name};
            proxy_read_timeout 120s;
        }}
        location / {{ return 403; }}
    }}
}}
"""


def write_config(directory: Path, text: str) -> Path:
    """DIR/proxy/nginx.conf (0600) and the folders nginx writes to."""
    proxy = Path(directory).resolve() / PROXY_DIR
    (proxy / "tmp").mkdir(parents=True, exist_ok=True)
    os.chmod(proxy, 0o700)
    path = proxy / CONFIG_FILE
    replace_file(path, text.encode("utf-8"), mode=0o600)
    return path


def nginx_command(nginx: str, config: Path) -> list[str]:
    proxy = Path(config).parent
    return [nginx, "-p", str(proxy), "-e", str(proxy / "error.log"), "-c", str(config)]


def check_config(nginx: str, config: Path) -> None:
    """`nginx -t`: a config nginx refuses (a bad address, an unreadable key) is one line here,
    before the SuperLink starts."""
    try:
        done = subprocess.run(
            [*nginx_command(nginx, config), "-t", "-q"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProxyError(f"cannot run {nginx}: {exc}") from exc
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        detail = lines[0] if lines else f"exit code {done.returncode}"
        raise ProxyError(f"nginx refused the proxy config: {detail}")
