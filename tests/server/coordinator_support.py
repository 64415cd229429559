"""What the coordinator's tests share: registered sites, free ports, a foundation directory
that passes preflight, and the one-line error a refused command prints."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from fedrad.client.site.config import init_site
from fedrad.server.site_registry import add_site


def site_key(tmp_path: Path, site_id: str) -> Path:
    """The public node key `fedrad-site init` makes for `site_id`."""
    (tmp_path / "data").mkdir(exist_ok=True)
    config = init_site(tmp_path / site_id, site_id=site_id, data_dir=tmp_path / "data")
    return config.node_key.with_suffix(".pub")


def register_sites(directory: Path, tmp_path: Path, *site_ids: str) -> None:
    for site_id in site_ids:
        add_site(directory, site_id, site_key(tmp_path, site_id))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """Distinct free ports (bound together, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def foundation_dir(tmp_path: Path, trainable: object = ("lm.lora_A",)) -> Path:
    directory = tmp_path / "foundation"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(b"x")
    meta = {"trainable": list(trainable)} if isinstance(trainable, tuple) else {}
    (directory / "metadata.json").write_text(json.dumps(meta))
    return directory


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]
