"""The resumable downloader against an HTTP server on 127.0.0.1 that misbehaves on demand."""
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from modules.download import download_file
from modules.errors import UserError
from modules.pretrained import FILES, download_gpt2

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")

DATA = bytes(range(256)) * 12_000  # 3 MB: several read chunks


class _Handler(BaseHTTPRequestHandler):
    """Serves server.files with HTTP Range support; server.cut_once, .fail_once and .supports_range
    make it cut a response halfway, answer an error once, or ignore Range headers."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        if self.path in server.fail_once:
            self.send_error(server.fail_once.pop(self.path))
            return
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and server.supports_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in server.cut_once:  # announce everything, send half, hang up
            server.cut_once.discard(self.path)
            body = body[: len(body) // 2]
        server.bytes_sent += len(body)  # counted before writing: the client may finish before write() returns
        self.wfile.write(body)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client that hangs up early (as the size check does) is expected here


@pytest.fixture
def server():
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.bytes_sent = {"/data.bin": DATA}, [], 0
    httpd.cut_once, httpd.fail_once, httpd.supports_range = set(), {}, True
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def fetch(server, tmp_path, **options):
    return download_file(f"{server.url}/data.bin", tmp_path / "data.bin", backoff_seconds=0, **options)


def test_full_download_then_skipped_when_complete(server, tmp_path, capsys):
    path = fetch(server, tmp_path)
    assert path.read_bytes() == DATA and not (tmp_path / "data.bin.part").exists()
    assert server.requests == [("/data.bin", None)]
    fetch(server, tmp_path)
    assert len(server.requests) == 1  # no second request at all
    assert "already complete" in capsys.readouterr().out


def test_cut_connection_resumes_with_range_instead_of_restarting(server, tmp_path):
    server.cut_once.add("/data.bin")
    assert fetch(server, tmp_path, progress=False).read_bytes() == DATA
    half = len(DATA) // 2
    assert server.requests == [("/data.bin", None), ("/data.bin", f"bytes={half}-")]
    assert server.bytes_sent == len(DATA)  # not one byte sent twice


def test_part_left_by_an_interrupted_run_is_resumed(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(DATA[:1000])
    assert fetch(server, tmp_path, progress=False).read_bytes() == DATA
    assert server.requests == [("/data.bin", "bytes=1000-")] and server.bytes_sent == len(DATA) - 1000


def test_complete_part_is_finished_without_downloading(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(DATA)
    assert fetch(server, tmp_path, progress=False).read_bytes() == DATA
    assert server.bytes_sent == 0


def test_server_without_range_support_starts_over(server, tmp_path):
    server.supports_range = False
    (tmp_path / "data.bin.part").write_bytes(b"x" * 1000)
    assert fetch(server, tmp_path, progress=False).read_bytes() == DATA


def test_transient_error_is_retried(server, tmp_path):
    server.fail_once["/data.bin"] = 503
    assert fetch(server, tmp_path, progress=False).read_bytes() == DATA
    assert len(server.requests) == 2


def test_404_names_the_url_and_is_not_retried(server, tmp_path):
    url = f"{server.url}/missing.bin"
    with pytest.raises(UserError, match=re.escape(url) + ".*404.*pass --data PATH"):
        download_file(url, tmp_path / "missing.bin", hint="Or pass --data PATH.", backoff_seconds=0)
    assert len(server.requests) == 1 and list(tmp_path.iterdir()) == []


def test_size_mismatch_is_refused_and_nothing_is_kept(server, tmp_path):
    with pytest.raises(UserError, match=f"{len(DATA)} bytes, but {len(DATA) + 1} were expected"):
        fetch(server, tmp_path, expected_size=len(DATA) + 1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_of_the_wrong_size_is_downloaded_again(server, tmp_path):
    (tmp_path / "data.bin").write_bytes(b"stale")
    assert fetch(server, tmp_path, expected_size=len(DATA), progress=False).read_bytes() == DATA


def test_no_network_names_the_url_and_where_to_put_the_file(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/gpt-2/models/124M/checkpoint"
    with pytest.raises(UserError) as error:
        download_gpt2("124M", tmp_path / "gpt2", base_url=f"http://127.0.0.1:{port}/gpt-2/models",
                      retries=1, backoff_seconds=0)
    message = str(error.value)
    assert url in message and "refused" in message.lower()
    assert f"put them in {tmp_path / 'gpt2' / '124M'}/" in message and "model.ckpt.index" in message


def test_download_gpt2_fetches_openais_files_into_models_dir_size(server, tmp_path):
    server.files = {f"/gpt-2/models/355M/{name}": name.encode() * 100 for name in FILES}
    model_dir = download_gpt2("355M", tmp_path / "gpt2", base_url=f"{server.url}/gpt-2/models", progress=False)
    assert model_dir == tmp_path / "gpt2" / "355M"
    assert sorted(path.name for path in model_dir.iterdir()) == sorted(FILES)
    assert all((model_dir / name).read_bytes() == name.encode() * 100 for name in FILES)
