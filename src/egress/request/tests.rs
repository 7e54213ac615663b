use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncWriteExt, ReadBuf};

use super::*;

async fn parse(input: &[u8]) -> Result<(ProxyRequest, Vec<u8>), HeadError> {
    let mut reader = input;
    read_request(&mut reader).await
}

async fn parse_err(input: &[u8]) -> HeadError {
    match parse(input).await {
        Ok((request, _)) => panic!("expected an error, parsed {request:?}"),
        Err(e) => e,
    }
}

fn assert_malformed(err: &HeadError) {
    assert!(matches!(err, HeadError::Malformed(_)), "got {err:?}");
    assert_eq!(err.status(), Some((400, "Bad Request")));
}

/// Hands out its input one byte per read, so terminators straddle reads.
struct Trickle<'a>(&'a [u8]);

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let [first, rest @ ..] = self.0 {
            buf.put_slice(&[*first]);
            self.0 = rest;
        }
        Poll::Ready(Ok(()))
    }
}

/// An endless header line, counting what was taken from it.
struct Endless {
    served: usize,
}

impl AsyncRead for Endless {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let prefix: &[u8] = b"GET http://a/ HTTP/1.1\r\nX: ";
        let n = buf.remaining();
        for i in 0..n {
            let at = self.served + i;
            buf.put_slice(&[prefix.get(at).copied().unwrap_or(b'a')]);
        }
        self.served += n;
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn connect_name() {
    let (request, leftover) =
        parse(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
            .await
            .unwrap();
    assert_eq!(request.method, Method::Connect);
    assert_eq!(request.host, "example.com");
    assert_eq!(request.port, 443);
    assert!(request.upstream_head.is_empty());
    assert!(leftover.is_empty());
}

#[tokio::test]
async fn connect_ipv6_and_leftover() {
    let (request, leftover) = parse(
        b"CONNECT [::1]:443 HTTP/1.1\r\nProxy-Authorization: Basic eA==\r\n\r\n\x16\x03\x01\x00\xffearly",
    )
    .await
    .unwrap();
    assert_eq!(request.method, Method::Connect);
    assert_eq!(request.host, "::1");
    assert_eq!(request.port, 443);
    assert_eq!(leftover, b"\x16\x03\x01\x00\xffearly");
}

#[tokio::test]
async fn connect_without_headers_and_byte_by_byte() {
    let input = b"CONNECT 10.0.0.1:8443 HTTP/1.0\r\n\r\nrest";
    let (request, leftover) = read_request(&mut Trickle(input)).await.unwrap();
    assert_eq!((request.host.as_str(), request.port), ("10.0.0.1", 8443));
    // Reading one byte at a time stops right at the terminator.
    assert!(leftover.is_empty());
}

#[tokio::test]
async fn connect_bad_authorities() {
    for target in [
        "example.com",
        "example.com:",
        "example.com:0",
        "example.com:70000",
        "example.com:99999999",
        "example.com:+1",
        "example.com:443:1",
        "::1:443",
        "[::1]",
        "[::1]443",
        "[::1:443",
        "[fe80::1%25eth0]:443",
        "[not-v6]:443",
        ":443",
        "user@example.com:443",
        "exa%6dple.com:443",
        "example.com/x:443",
    ] {
        let input = format!("CONNECT {target} HTTP/1.1\r\n\r\n");
        let err = parse_err(input.as_bytes()).await;
        assert!(matches!(err, HeadError::Malformed(_)), "{target}: {err:?}");
    }
    let long_host = "a".repeat(MAX_HOST_LEN + 1);
    assert_malformed(
        &parse_err(format!("CONNECT {long_host}:443 HTTP/1.1\r\n\r\n").as_bytes()).await,
    );
}

#[tokio::test]
async fn connect_port_bounds() {
    for (target, port) in [("h:1", 1), ("h:65535", 65535), ("h:00080", 80)] {
        let input = format!("CONNECT {target} HTTP/1.1\r\n\r\n");
        let (request, _) = parse(input.as_bytes()).await.unwrap();
        assert_eq!(request.port, port, "{target}");
    }
}

#[tokio::test]
async fn forward_rewrites_head() {
    let input = b"GET http://Example.COM/search?q=a%20b&x=1 HTTP/1.1\r\n\
        Host: other.example\r\n\
        User-Agent: curl/8.5.0\r\n\
        Proxy-Connection: Keep-Alive\r\n\
        Proxy-Authorization: Basic c2VjcmV0\r\n\
        Connection: keep-alive, X-Hop ,  \r\n\
        Keep-Alive: timeout=5\r\n\
        x-hop: 1\r\n\
        Accept: */*\r\n\
        \r\n";
    let (request, leftover) = parse(input).await.unwrap();
    assert_eq!(request.method, Method::Forward);
    assert_eq!(request.host, "Example.COM");
    assert_eq!(request.port, 80);
    assert!(leftover.is_empty());
    assert_eq!(
        String::from_utf8(request.upstream_head).unwrap(),
        "GET /search?q=a%20b&x=1 HTTP/1.1\r\n\
         Host: Example.COM\r\n\
         User-Agent: curl/8.5.0\r\n\
         Accept: */*\r\n\
         Connection: close\r\n\
         \r\n"
    );
}

#[tokio::test]
async fn forward_adds_host_with_port_and_keeps_body_start() {
    let input = b"POST HTTP://[2001:db8::1]:8080?x=1 HTTP/1.1\r\n\
        Content-Length: 11\r\n\
        Content-Length: 11\r\n\
        Connection: content-length\r\n\
        \r\n\
        hello";
    let (request, leftover) = parse(input).await.unwrap();
    assert_eq!((request.host.as_str(), request.port), ("2001:db8::1", 8080));
    assert_eq!(leftover, b"hello");
    assert_eq!(
        String::from_utf8(request.upstream_head).unwrap(),
        "POST /?x=1 HTTP/1.1\r\n\
         Host: [2001:db8::1]:8080\r\n\
         Content-Length: 11\r\n\
         Connection: close\r\n\
         \r\n"
    );
}

#[tokio::test]
async fn forward_defaults() {
    let cases: [(&[u8], &str); 4] = [
        (
            b"GET http://a.test HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.test\r\n",
        ),
        (
            b"OPTIONS http://a.test HTTP/1.1\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: a.test\r\n",
        ),
        (
            b"HEAD http://a.test:80/x HTTP/1.0\r\nhost: a.test:80\r\n\r\n",
            "HEAD /x HTTP/1.0\r\nhost: a.test\r\n",
        ),
        (
            b"GET http://a.test:8080/ HTTP/1.1\r\nHost:a.test:8080\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.test:8080\r\n",
        ),
    ];
    for (input, expected) in cases {
        let (request, _) = parse(input).await.unwrap();
        let expected = format!("{expected}Connection: close\r\n\r\n");
        assert_eq!(String::from_utf8(request.upstream_head).unwrap(), expected);
    }
}

#[tokio::test]
async fn forward_keeps_obs_text_values() {
    let (request, _) = parse(b"GET http://a/ HTTP/1.1\r\nX-Name: caf\xc3\xa9\t \r\n\r\n")
        .await
        .unwrap();
    assert!(
        request
            .upstream_head
            .windows(12)
            .any(|w| w == b"X-Name: caf\xc3")
    );
}

#[tokio::test]
async fn https_absolute_is_unsupported() {
    let err = parse_err(b"GET https://example.com/ HTTP/1.1\r\n\r\n").await;
    assert!(
        matches!(&err, HeadError::UnsupportedScheme(s) if s == "https"),
        "{err:?}"
    );
    assert_eq!(err.status(), Some((501, "Not Implemented")));
    let body = String::from_utf8(err.response().unwrap()).unwrap();
    assert!(
        body.starts_with("HTTP/1.1 501 Not Implemented\r\n"),
        "{body}"
    );
    assert!(body.contains("use CONNECT for https"), "{body}");

    let err = parse_err(b"GET FTP://example.com/ HTTP/1.1\r\n\r\n").await;
    assert!(
        matches!(&err, HeadError::UnsupportedScheme(s) if s == "ftp"),
        "{err:?}"
    );
}

#[tokio::test]
async fn forward_bad_targets() {
    for target in [
        "http://user@example.com/",
        "http://user:pw@example.com/",
        "http://example.com/#frag",
        "http:///path",
        "http://example.com:0/",
        "http://example.com:/",
        "/origin-form",
        "example.com:80",
        "*",
        "1http://example.com/",
    ] {
        let input = format!("GET {target} HTTP/1.1\r\n\r\n");
        let err = parse_err(input.as_bytes()).await;
        assert!(matches!(err, HeadError::Malformed(_)), "{target}: {err:?}");
    }
}

#[tokio::test]
async fn bad_request_lines() {
    for line in [
        &b"get http://a/ HTTP/1.1"[..],
        b"GET  http://a/ HTTP/1.1",
        b"GET http://a/ HTTP/1.1 ",
        b"GET http://a/",
        b"GET http://a/ HTTP/2.0",
        b"GET http://a/ http/1.1",
        b"ABCDEFGHIJKLMNOPQ http://a/ HTTP/1.1",
        b"GET http://a/\x7f HTTP/1.1",
        b"GET http://a/\xc3\xa9 HTTP/1.1",
        b"",
    ] {
        let input = [line, b"\r\nHost: a\r\n\r\n"].concat();
        assert_malformed(&parse_err(&input).await);
    }
}

#[tokio::test]
async fn bad_header_lines() {
    for header in [
        &b" folded: x"[..],
        b"X-Ok: 1\r\n\tfolded",
        b"No colon here",
        b"Bad Name: x",
        b": empty",
        b"X: a\rb",
        b"X: a\x00b",
        b"X: a\nY: b",
        b"Content-Length: 5\r\nTransfer-Encoding: chunked",
        b"Content-Length: 5\r\nContent-Length: 6",
        b"Content-Length: -5",
        b"Content-Length: 5, 5",
        b"Host: a\r\nHost: a",
    ] {
        let input = [&b"POST http://a/ HTTP/1.1\r\n"[..], header, b"\r\n\r\n"].concat();
        let err = parse_err(&input).await;
        assert!(
            matches!(err, HeadError::Malformed(_)),
            "{:?}: {err:?}",
            String::from_utf8_lossy(header)
        );
    }
}

#[tokio::test]
async fn header_count_limit() {
    let head = |n: usize| {
        let mut head = b"GET http://a/ HTTP/1.1\r\n".to_vec();
        for i in 0..n {
            head.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        head
    };
    assert!(parse(&head(MAX_HEADERS)).await.is_ok());
    assert_malformed(&parse_err(&head(MAX_HEADERS + 1)).await);
}

#[tokio::test]
async fn too_large_stops_reading_at_the_cap() {
    let mut endless = Endless { served: 0 };
    let err = read_request(&mut endless).await.unwrap_err();
    assert!(matches!(err, HeadError::TooLarge), "{err:?}");
    assert_eq!(err.status(), Some((431, "Request Header Fields Too Large")));
    assert_eq!(endless.served, MAX_HEAD_BYTES);
}

#[tokio::test]
async fn head_of_exactly_the_cap_is_accepted() {
    let mut head = b"GET http://a/ HTTP/1.1\r\nX: ".to_vec();
    head.resize(MAX_HEAD_BYTES - 4, b'v');
    head.extend_from_slice(b"\r\n\r\n");
    assert!(parse(&head).await.is_ok());
    head.insert(30, b'v');
    assert!(matches!(parse_err(&head).await, HeadError::TooLarge));
}

#[tokio::test]
async fn eof_mid_head_is_closed() {
    for input in [
        &b""[..],
        b"GET http://a/ HTTP/1.1\r\nHost: a\r\n",
        b"CONNECT a:1 HTTP/1.1\r\n\r",
    ] {
        let err = parse_err(input).await;
        assert!(matches!(err, HeadError::Closed), "{err:?}");
        assert_eq!(err.status(), None);
        assert!(err.response().is_none());
    }
}

#[tokio::test]
async fn io_error_has_no_status() {
    let err = HeadError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    assert_eq!(err.status(), None);
}

#[tokio::test]
async fn garbage_is_refused_without_waiting_for_more() {
    // The peer stays open: only an early refusal can end these reads.
    for garbage in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
        b"\x00\x00\x00\x00",
        b"get / HTTP/1.1\r\n",
        b"GET http://a/ HTTP/1.1\nHost: a\n",
        b"GET http://a/ HTTP/1.1\r\nX: a\x01",
        b"GET http://a/ HTTP/1.1\r\rX",
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        b" GET",
        b"SSH-2.0-OpenSSH_9.6\r\n",
    ] {
        let (mut guest, mut host) = tokio::io::duplex(1024);
        guest.write_all(garbage).await.unwrap();
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(10), read_request(&mut host));
        let err = read.await.expect("refused early").unwrap_err();
        assert!(
            matches!(err, HeadError::Malformed(_)),
            "{:?}: {err:?}",
            String::from_utf8_lossy(garbage)
        );
        drop(guest);
    }
}

#[tokio::test]
async fn a_split_crlf_is_not_refused_early() {
    let (mut guest, mut host) = tokio::io::duplex(1024);
    let reading = tokio::spawn(async move { read_request(&mut host).await });
    for part in [
        &b"CONNECT a:1 HTTP/1.1\r"[..],
        b"\nX: y\r",
        b"\n\r",
        b"\nearly",
    ] {
        guest.write_all(part).await.unwrap();
        tokio::task::yield_now().await;
    }
    let (request, leftover) = reading.await.unwrap().unwrap();
    assert_eq!(request.host, "a");
    assert_eq!(leftover, b"early");
}

#[test]
fn reply_bytes() {
    assert_eq!(
        reply(403, "Forbidden", "host not allowed: example.com"),
        b"HTTP/1.1 403 Forbidden\r\n\
          Content-Type: text/plain; charset=utf-8\r\n\
          Content-Length: 30\r\n\
          Connection: close\r\n\
          Proxy-Agent: airlock\r\n\
          \r\n\
          host not allowed: example.com\n"
    );
    // Content-Length counts bytes, not characters.
    let bytes = reply(502, "Bad Gateway", "é");
    let text = String::from_utf8(bytes).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.contains("\r\nContent-Length: 3\r\n"), "{head}");
    assert_eq!(body.len(), 3);
    // A reason cannot inject headers.
    let text = String::from_utf8(reply(400, "Bad\r\nX-Evil: 1", "")).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 400 Bad  X-Evil: 1\r\nContent-Type"),
        "{text}"
    );
}

#[test]
fn connect_established_bytes() {
    assert_eq!(
        connect_established(),
        b"HTTP/1.1 200 Connection established\r\nProxy-Agent: airlock\r\n\r\n"
    );
}

#[test]
fn error_responses_are_complete() {
    for err in [
        HeadError::TooLarge,
        malformed("x"),
        HeadError::UnsupportedScheme("ftp".into()),
    ] {
        let text = String::from_utf8(err.response().unwrap()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let (status, reason) = err.status().unwrap();
        assert!(head.starts_with(&format!("HTTP/1.1 {status} {reason}\r\n")));
        assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
    }
}

#[test]
fn debug_hides_upstream_head() {
    let request = ProxyRequest {
        method: Method::Forward,
        host: "a".into(),
        port: 80,
        upstream_head: b"GET / HTTP/1.1\r\nAuthorization: Bearer secret\r\n\r\n".to_vec(),
    };
    assert!(!format!("{request:?}").contains("secret"));
}
