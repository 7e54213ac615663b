"""Network egress by policy, through the SDK over Streamable HTTP, on real VMs.

Every server the guests reach is on this host's loopback, named through
--egress-hosts (allowed.test, denied.test, ... -> 127.0.0.1): the host never
connects anywhere else.

1. No egress flags: curl and Python's urllib fail at once, to a name or to
   127.0.0.1.
2. --egress-allow allowed.test (and tls.test on one port):
   - curl, urllib and `pip download` from a simple index work;
   - denied.test gets the policy's 403, and so does 127.0.0.1 through the
     proxy (direct, it is the guest's own loopback: refused);
   - HTTPS through a CONNECT tunnel, end to end (curl -k), only on the
     allowed port;
   - a 100 MiB download completes and the gateway's memory stays bounded;
   - 200 concurrent connections from one sandbox: the limit's worth get
     through, every other one gets a 429, and another sandbox still works;
   - metering in sandbox_info and /metrics.
3. Principals from a --config file, each with its own allowlist, reach only
   their own.
"""

from __future__ import annotations

import http.server
import io
import os
import secrets
import ssl
import tempfile
import threading
import time
import zipfile

import anyio
from harness import FIRST_CALL_TIMEOUT, HttpServer, call, check, log, run, text_of

BIG = 100 << 20
LIMIT = 16
WHEEL = "tinypkg-0.1-py3-none-any.whl"


def make_wheel() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("tinypkg/__init__.py", "VALUE = 42\n")
        z.writestr("tinypkg-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1\n")
        z.writestr("tinypkg-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("tinypkg-0.1.dist-info/RECORD", "")
    return buf.getvalue()


WHEEL_BYTES = make_wheel()
CHUNK = bytes(range(256)) * 4096  # 1 MiB


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def send_body(self, body: bytes, kind: str = "text/plain") -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        host = self.headers.get("Host", "")
        if self.path == "/x":
            self.send_body(f"hello from {host.split(':')[0]}\n".encode())
        elif self.path == "/big":
            self.send_response(200)
            self.send_header("Content-Length", str(BIG))
            self.end_headers()
            for _ in range(BIG // len(CHUNK)):
                self.wfile.write(CHUNK)
        elif self.path.rstrip("/") == "/simple/tinypkg":
            html = f'<html><body><a href="/packages/{WHEEL}">{WHEEL}</a></body></html>'
            self.send_body(html.encode(), "text/html")
        elif self.path == f"/packages/{WHEEL}":
            self.send_body(WHEEL_BYTES, "application/octet-stream")
        elif self.path == "/hold":
            # Held open until the client goes: a connection that stays.
            self.send_response(200)
            self.send_header("Content-Length", "1")
            self.end_headers()
            self.wfile.flush()
            time.sleep(60)
        else:
            self.send_error(404)


def self_signed(name: str) -> tuple[str, str]:
    """A throwaway certificate and key for `name`, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    d = tempfile.mkdtemp(prefix="airlock-tls-")
    cert_path, key_path = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def start_server(tls: bool) -> tuple[http.server.ThreadingHTTPServer, int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls:
        cert, key = self_signed("tls.test")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


async def bash(session, script: str, timeout: float = 300.0, **extra) -> str:
    r = await run(session, script, language="bash", timeout=timeout, **extra)
    check(not r.is_error, f"bash ran: {text_of(r)[:500]!r}")
    return text_of(r)


def rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} missing")


async def no_egress(port: int) -> None:
    with HttpServer("--pool-size", "0") as server:
        async with server.session("alice") as s:
            out = await bash(
                s,
                f"s=$(date +%s%N); curl -sS -m 60 http://allowed.test:{port}/x; echo rc=$?; "
                f"curl -sS -m 60 http://127.0.0.1:{port}/x; echo rc=$?; "
                f"echo ms=$(( ($(date +%s%N) - s) / 1000000 ))",
                timeout=FIRST_CALL_TIMEOUT,
            )
            log("no egress:", out)
            check(out.count("rc=7") == 2, f"without egress, curl cannot connect, to a name or to 127.0.0.1: {out!r}")
            # curl says "Couldn't connect to server" for ECONNREFUSED.
            check("Couldn't connect to server" in out or "refused" in out, f"the error is a refused connection: {out!r}")
            ms = int(out.rsplit("ms=", 1)[1].split()[0])
            # curl's own limit is 60 s each: a hang would take minutes.
            check(ms < 30_000, f"both fail at once, not by timing out ({ms} ms)")
            r = await run(
                s,
                "import urllib.request\n"
                "try:\n"
                f"    urllib.request.urlopen('http://allowed.test:{port}/x', timeout=60)\n"
                "    print('reached')\n"
                "except Exception as e:\n"
                "    print('failed:', type(e).__name__, e)\n",
            )
            check("failed:" in text_of(r) and "refused" in text_of(r).lower(), f"urllib fails with a refusal: {text_of(r)!r}")


async def with_egress(port: int, tls_port: int, hosts: str) -> None:
    carol, dave = secrets.token_hex(24), secrets.token_hex(24)
    fd, config = tempfile.mkstemp(prefix="airlock-config-", suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write(
            f'[principals.carol]\ntoken = "{carol}"\negress_allow = ["carol.test"]\n\n'
            f'[principals.dave]\ntoken = "{dave}"\negress_allow = ["dave.test"]\nmax_sandboxes = 1\n'
        )
    args = (
        "--egress-allow", "allowed.test",
        "--egress-allow", f"tls.test:{tls_port}",
        "--egress-hosts", hosts,
        "--egress-max-connections", str(LIMIT),
        "--config", config,
    )
    with HttpServer(*args) as server:
        assert server.proc is not None
        async with server.session("alice") as s:
            out = await bash(s, f"curl -sS http://allowed.test:{port}/x", timeout=FIRST_CALL_TIMEOUT)
            check("hello from allowed.test" in out, f"curl reaches the allowed name: {out!r}")
            sid = (await run(s, "print(1)")).structured_content["sandbox_id"]

            r = await run(s, f"import urllib.request\nprint(urllib.request.urlopen('http://allowed.test:{port}/x', timeout=60).read().decode())")
            check("hello from allowed.test" in text_of(r), f"Python's urllib goes through the proxy: {text_of(r)!r}")

            out = await bash(
                s,
                f"cd /tmp && pip download --no-deps --disable-pip-version-check --no-cache-dir "
                f"--index-url http://allowed.test:{port}/simple/ --trusted-host allowed.test tinypkg -d dl 2>&1 | tail -3; ls dl",
            )
            check(WHEEL in out, f"pip downloads from the simple index: {out!r}")

            out = await bash(s, f"curl -sS -w ' status=%{{http_code}}' http://denied.test:{port}/x")
            check("status=403" in out and "blocked by airlock egress policy: denied.test is not allowed" in out,
                  f"denied.test gets the policy's answer: {out!r}")
            out = await bash(s, f"curl -sS -w ' status=%{{http_code}}' --noproxy '' -x http://127.0.0.1:800 http://127.0.0.1:{port}/x")
            check("status=403" in out and "127.0.0.1 is not allowed" in out, f"127.0.0.1 through the proxy is refused: {out!r}")
            out = await bash(s, f"curl -sS http://127.0.0.1:{port}/x; echo rc=$?")
            check("rc=7" in out, f"127.0.0.1 directly is the guest's own loopback: refused: {out!r}")

            out = await bash(s, f"curl -k -sS https://tls.test:{tls_port}/x")
            check("hello from tls.test" in out, f"HTTPS through a CONNECT tunnel, end to end: {out!r}")
            out = await bash(s, f"curl -k -sS https://tls.test:{port}/x; echo rc=$?")
            check("403" in out and "rc=0" not in out, f"tls.test on another port is refused: {out!r}")

            before = rss_kib(server.proc.pid, "VmHWM")
            out = await bash(s, f"curl -sS -o /dev/null -w '%{{size_download}} %{{speed_download}}' http://allowed.test:{port}/big", timeout=900)
            size, speed = out.split()[:2]
            check(int(size) == BIG, f"the 100 MiB download completes ({size} bytes)")
            after = rss_kib(server.proc.pid, "VmHWM")
            log(f"LATENCY egress 100 MiB download: {float(speed) / 1e6:.1f} MB/s; gateway peak RSS {before} -> {after} KiB")
            check(after - before < 64 * 1024, f"the gateway's peak memory grows by less than 64 MiB ({after - before} KiB)")

            many = (
                "import socket, time\n"
                "socks = []\n"
                "for i in range(200):\n"
                "    c = socket.create_connection(('127.0.0.1', 800), timeout=120)\n"
                f"    c.sendall(b'CONNECT allowed.test:{port} HTTP/1.1\\r\\nHost: allowed.test:{port}\\r\\n\\r\\n')\n"
                "    socks.append(c)\n"
                "codes = []\n"
                "for c in socks:\n"
                "    try:\n"
                "        line = c.recv(64).split(b'\\r\\n')[0].decode()\n"
                "        codes.append(line.split()[1] if line else 'closed')\n"
                "    except Exception as e:\n"
                "        codes.append(type(e).__name__)\n"
                "print('codes', {k: codes.count(k) for k in set(codes)})\n"
                "held = [s for s, code in zip(socks, codes) if code == '200']\n"
            )
            r = await run(s, many, timeout=600)
            out = text_of(r)
            log("200 connections:", out)
            check(f"'200': {LIMIT}" in out and f"'429': {200 - LIMIT}" in out,
                  f"{LIMIT} connections get through, the other {200 - LIMIT} get a 429: {out!r}")
            async with server.session("bob") as b:
                out = await bash(b, f"curl -sS http://allowed.test:{port}/x")
                check("hello from allowed.test" in out, f"another sandbox still gets through while the first is at its limit: {out!r}")
            r = await run(s, "for c in held: c.close()\nprint('closed', len(held))")
            check(f"closed {LIMIT}" in text_of(r), f"the held connections close: {text_of(r)!r}")

            r = await call(s, "sandbox_info", sandbox_id=sid)
            e = r.structured_content["egress"]
            log("sandbox_info egress:", e)
            check(e["bytes_in"] >= BIG and e["connections_allowed"] >= 6 + LIMIT and e["connections_denied"] >= 3 + 200 - LIMIT,
                  f"sandbox_info meters the egress: {e}")
            metrics = server.metrics(server.tokens["alice"])
            line = [l for l in metrics.splitlines() if l.startswith('airlock_egress_bytes_in_total{principal="alice"}')]
            check(line and float(line[0].split()[1]) >= BIG, f"/metrics has alice's bytes in: {line}")
            line = [l for l in metrics.splitlines() if l.startswith('airlock_egress_connections_denied_total{principal="alice"}')]
            check(line and float(line[0].split()[1]) >= 3, f"/metrics has alice's denials: {line}")

        for who, token, own, other in (("carol", carol, "carol.test", "dave.test"), ("dave", dave, "dave.test", "carol.test")):
            async with server.session(who, token=token) as s:
                out = await bash(s, f"curl -sS http://{own}:{port}/x; curl -sS -w ' status=%{{http_code}}' http://{other}:{port}/x; curl -sS -w ' status=%{{http_code}}' http://allowed.test:{port}/x", timeout=FIRST_CALL_TIMEOUT)
                check(f"hello from {own}" in out, f"{who} reaches its own allowlist: {out!r}")
                check(f"blocked by airlock egress policy: {other} is not allowed" in out, f"{who} does not reach the other's: {out!r}")
                check("allowed.test is not allowed" in out, f"{who}'s own list replaces the default: {out!r}")
                if who == "dave":
                    r = await call(s, "fork_sandbox")
                    check(r.is_error and "its limit" in text_of(r), f"dave's max_sandboxes = 1 from the config file holds: {text_of(r)!r}")
    os.unlink(config)


async def main() -> None:
    plain, port = start_server(tls=False)
    tls, tls_port = start_server(tls=True)
    fd, hosts = tempfile.mkstemp(prefix="airlock-hosts-")
    with os.fdopen(fd, "w") as f:
        f.write("# every name the guests use is this host's loopback\n")
        f.write("127.0.0.1 allowed.test denied.test tls.test carol.test dave.test\n")
    try:
        await no_egress(port)
        await with_egress(port, tls_port, hosts)
    finally:
        plain.shutdown()
        tls.shutdown()
        os.unlink(hosts)
    log("egress test passed")


if __name__ == "__main__":
    anyio.run(main)
