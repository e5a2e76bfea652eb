"""Static files: ``start(..., static_dir=DIR)`` / ``--static DIR`` serve plain HTTP on the WebSocket port."""

from __future__ import annotations

import http.client
import os
import subprocess
import urllib.error
import urllib.request
from email.utils import parsedate_to_datetime

import pytest
import warpsocket
from helpers import ECHO_WORKER, RawConn, ServerProcess, ask, connect, free_port, warpsocket_command

SECRET = b"TOP-SECRET-do-not-serve-7f3a"
INDEX = b"<!doctype html><title>home</title><h1>hello from static</h1>\n"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8


@pytest.fixture
def site(tmp_path):
    """``tmp_path/site`` with a few files; ``tmp_path/secret.txt`` and ``tmp_path/outside/`` next to it."""
    root = tmp_path / "site"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_bytes(INDEX)
    (root / "style.css").write_text("body { color: red }\n")
    (root / "app.js").write_text("console.log('hi');\n")
    (root / "data.json").write_text('{"ok": true}\n')
    (root / "assets" / "logo.png").write_bytes(PNG)
    (root / "assets" / "notes.txt").write_text("notes\n")
    (tmp_path / "secret.txt").write_bytes(SECRET)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    return root


@pytest.fixture
def static_server(start_server, site):
    return start_server(static_dir=str(site))


def request(server, method, path, headers=None):
    """Send one raw request (the path goes out byte for byte, unnormalised); return (status, headers, body).

    The request says ``Connection: close``, so everything up to EOF is the response: a HEAD
    response (or a 304) that carried a body would show up as a non-empty ``body``.
    """
    with RawConn(server.port) as conn:
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while True:
            try:
                chunk = conn.sock.recv(1 << 20)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"incomplete HTTP response: {data[:200]!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert status_line.startswith("HTTP/1.1 "), status_line
    resp_headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        resp_headers[name.strip().lower()] = value.strip()
    if method != "HEAD" and "content-length" in resp_headers:
        assert len(body) == int(resp_headers["content-length"]), "body does not match Content-Length"
    return int(status_line.split()[1]), resp_headers, body


def get(server, path, headers=None):
    return request(server, "GET", path, headers)


# --------------------------------------------------------------------------
# serving
# --------------------------------------------------------------------------


def test_root_serves_index_html(static_server):
    status, headers, body = get(static_server, "/")
    assert status == 200
    assert body == INDEX
    assert headers["content-type"].startswith("text/html")
    assert int(headers["content-length"]) == len(INDEX)
    assert get(static_server, "/index.html")[2] == INDEX


def test_with_urllib(static_server):
    with urllib.request.urlopen(f"http://127.0.0.1:{static_server.port}/", timeout=20) as resp:
        assert resp.status == 200
        assert resp.read() == INDEX


def test_with_http_client_and_query_string(static_server):
    conn = http.client.HTTPConnection("127.0.0.1", static_server.port, timeout=20)
    try:
        conn.request("GET", "/data.json?v=3")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read() == b'{"ok": true}\n'
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/index.html", "text/html"),
        ("/style.css", "text/css"),
        ("/app.js", ("text/javascript", "application/javascript")),
        ("/data.json", "application/json"),
        ("/assets/logo.png", "image/png"),
        ("/assets/notes.txt", "text/plain"),
    ],
)
def test_content_types(static_server, site, path, content_type):
    status, headers, body = get(static_server, path)
    assert status == 200
    assert headers["content-type"].split(";")[0].strip().startswith(content_type)
    assert body == (site / path.lstrip("/")).read_bytes()


def test_binary_file_is_served_byte_for_byte(static_server, site):
    big = os.urandom(3 * 1024 * 1024 + 17)
    (site / "assets" / "big.png").write_bytes(big)
    status, headers, body = get(static_server, "/assets/big.png")
    assert status == 200
    assert int(headers["content-length"]) == len(big)
    assert body == big


def test_percent_encoded_names(static_server, site):
    (site / "with space.txt").write_text("spaced\n")
    status, _, body = get(static_server, "/with%20space.txt")
    assert (status, body) == (200, b"spaced\n")
    assert get(static_server, "/index%2Ehtml")[2] == INDEX


def test_etag_last_modified_and_304(static_server):
    status, headers, _ = get(static_server, "/style.css")
    assert status == 200
    etag = headers["etag"]
    assert etag
    assert parsedate_to_datetime(headers["last-modified"]) is not None

    status, headers304, body = get(static_server, "/style.css", {"If-None-Match": etag})
    assert status == 304
    assert body == b""
    assert headers304.get("etag") == etag

    status, _, body = get(static_server, "/style.css", {"If-None-Match": '"some-other-etag"'})
    assert status == 200
    assert body


def test_etag_changes_when_the_file_changes(static_server, site):
    etag = get(static_server, "/data.json")[1]["etag"]
    (site / "data.json").write_text('{"ok": false, "changed": 1}\n')
    status, headers, body = get(static_server, "/data.json", {"If-None-Match": etag})
    assert status == 200
    assert body == b'{"ok": false, "changed": 1}\n'
    assert headers["etag"] != etag


def test_head_has_headers_and_no_body(static_server):
    status, headers, body = request(static_server, "HEAD", "/assets/logo.png")
    assert status == 200
    assert headers["content-type"] == "image/png"
    assert int(headers["content-length"]) == len(PNG)
    assert headers["etag"]
    assert headers["last-modified"]
    assert body == b""


def test_missing_file_is_404(static_server):
    for path in ("/nope.html", "/assets/nope.png", "/assets/", "/assets", "/index.html/x"):
        assert get(static_server, path)[0] == 404, path


def test_other_methods_get_405(static_server):
    for method in ("POST", "PUT", "DELETE"):
        status, headers, _ = request(static_server, method, "/index.html", {"Content-Length": "0"})
        assert status == 405, method
        assert "GET" in headers.get("allow", "")


# --------------------------------------------------------------------------
# no way out of the folder
# --------------------------------------------------------------------------


def traversal_paths(tmp_path):
    secret = tmp_path / "secret.txt"
    return [
        "/../secret.txt",
        "/../../secret.txt",
        "/assets/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/%2E%2E%2Fsecret.txt",
        "/..%2fsecret.txt",
        "/..%2Fsecret.txt",
        "/..%5csecret.txt",
        "/..\\secret.txt",
        "/assets/%2e%2e/%2e%2e/secret.txt",
        "/.%2e/secret.txt",
        "/%252e%252e/secret.txt",
        "//etc/passwd",
        "/%2fetc/passwd",
        "/" + str(secret),
        "/" + str(secret).lstrip("/"),
        "/%2F" + str(secret).lstrip("/").replace("/", "%2F"),
        "/../outside/secret.txt",
        "/%00/../secret.txt",
        "/index.html%00.png",
    ]


def test_traversal_attempts_are_404_and_never_leak(static_server, tmp_path):
    for path in traversal_paths(tmp_path):
        status, _, body = get(static_server, path)
        assert status == 404, f"{path} -> {status}"
        assert SECRET not in body, path
        assert b"root:" not in body, path


def test_absolute_paths_are_404(static_server, tmp_path):
    assert get(static_server, "//etc/passwd")[0] == 404
    assert get(static_server, "/" + str(tmp_path / "secret.txt"))[0] == 404
    assert get(static_server, "/../secret.txt")[0] == 404
    assert get(static_server, "/%2e%2e/secret.txt")[0] == 404
    assert get(static_server, "/%2E%2E%2Fsecret.txt")[0] == 404
    assert get(static_server, "/..%2fsecret.txt")[0] == 404


def test_symlink_to_a_file_outside_is_404(start_server, site, tmp_path):
    (site / "leak.txt").symlink_to(tmp_path / "secret.txt")
    server = start_server(static_dir=str(site))
    for method in ("GET", "HEAD"):
        status, _, body = request(server, method, "/leak.txt")
        assert status == 404
        assert SECRET not in body


def test_symlink_to_a_folder_outside_is_404(start_server, site, tmp_path):
    (site / "elsewhere").symlink_to(tmp_path / "outside", target_is_directory=True)
    server = start_server(static_dir=str(site))
    status, _, body = get(server, "/elsewhere/secret.txt")
    assert status == 404
    assert SECRET not in body


def test_static_dir_reached_through_a_symlink_still_serves(start_server, site, tmp_path):
    alias = tmp_path / "alias"
    alias.symlink_to(site, target_is_directory=True)
    server = start_server(static_dir=str(alias))
    assert get(server, "/")[:1] == (200,)
    assert get(server, "/")[2] == INDEX
    assert get(server, "/../secret.txt")[0] == 404


def test_relative_static_dir(start_server, site, monkeypatch):
    monkeypatch.chdir(site.parent)
    server = start_server(static_dir="site")
    monkeypatch.chdir("/")  # resolved at start(), not per request
    assert get(server, "/")[2] == INDEX


# --------------------------------------------------------------------------
# WebSockets on the same port, and the default without static files
# --------------------------------------------------------------------------


def test_websocket_upgrades_still_work_with_static_files(static_server):
    with connect(static_server, "/") as ws:
        assert ask(ws, "hello") == "hello"
        # plain requests in between do not disturb the open WebSocket
        assert get(static_server, "/")[0] == 200
        assert ask(ws, b"\x00\x01") == b"\x00\x01"
    with connect(static_server, "/index.html") as ws:
        assert ask(ws, "upgrade on a file's path") == "upgrade on a file's path"


def test_without_static_dir_plain_get_is_426(start_server):
    server = start_server()
    for path in ("/", "/index.html"):
        status, headers, _ = get(server, path)
        assert status == 426
    with connect(server) as ws:
        assert ask(ws, "x") == "x"


def test_missing_static_dir_raises_value_error(write_worker, tmp_path):
    worker = str(write_worker(ECHO_WORKER))
    with pytest.raises(ValueError, match="static"):
        warpsocket.start(bind="127.0.0.1:0", worker=worker, threads=1, static_dir=str(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("a file, not a folder")
    with pytest.raises(ValueError, match="static"):
        warpsocket.start(bind="127.0.0.1:0", worker=worker, threads=1, static_dir=str(tmp_path / "file.txt"))
    # nothing was left running: a server starts normally afterwards
    server = warpsocket.start(bind="127.0.0.1:0", worker=worker, threads=1)
    try:
        with connect(server) as ws:
            assert ask(ws, "ok") == "ok"
    finally:
        server.stop(timeout=10)


def test_cli_static_flag(write_worker, site, tmp_path):
    worker = write_worker(ECHO_WORKER)
    port = free_port()
    cli = ServerProcess(
        warpsocket_command(worker, "--bind", f"127.0.0.1:{port}", "--threads", "1", "--static", site),
        cwd=tmp_path,
    )
    try:
        cli.wait_listening(port)

        def fetch(path):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as resp:
                return resp.status, resp.headers.get("content-type"), resp.read()

        status, content_type, body = fetch("/")
        assert (status, body) == (200, INDEX)
        assert content_type.startswith("text/html")
        assert fetch("/style.css")[1].startswith("text/css")
        with pytest.raises(urllib.error.HTTPError) as info:
            fetch("/../secret.txt")
        assert info.value.code == 404
        with connect(f"ws://127.0.0.1:{port}/") as ws:
            assert ask(ws, "cli") == "cli"
    finally:
        cli.stop()


def test_cli_static_flag_with_missing_folder_fails(write_worker, tmp_path):
    worker = write_worker(ECHO_WORKER)
    result = subprocess.run(
        warpsocket_command(worker, "--bind", f"127.0.0.1:{free_port()}", "--static", tmp_path / "nope"),
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert b"static" in result.stderr
