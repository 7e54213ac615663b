//! Reads and parses the one HTTP proxy request head that opens each guest
//! proxy connection (CONNECT or absolute-URI), and builds the proxy's replies.
//!
//! The guest is hostile, so this is strict rather than forgiving: the head is
//! capped at [`MAX_HEAD_BYTES`] and [`MAX_HEADERS`], only CRLF line endings are
//! accepted, obs-fold, userinfo, fragments and request-smuggling shapes are
//! refused, and the host and port handed to the policy are syntactically clean.
//! Binary garbage (a TLS ClientHello sent to the proxy port, say) is refused as
//! soon as it arrives rather than after 16 KiB. One request per connection: for
//! absolute-URI requests the head is rewritten to origin-form with
//! `Connection: close`, and the caller splices raw bytes after it.

use std::fmt;
use std::net::Ipv6Addr;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Upper bound on a request head, terminator included. Also bounds the
/// leftover bytes returned with it, since reading stops at this many bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Upper bound on header fields in one head.
pub const MAX_HEADERS: usize = 100;

const MAX_METHOD_LEN: usize = 16;
/// A DNS name is at most 253 characters (255 octets on the wire).
const MAX_HOST_LEN: usize = 255;
/// Only echoed back for errors, so kept short.
const MAX_SCHEME_LEN: usize = 32;

/// What the client asked the proxy to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `CONNECT host:port`: open a tunnel, answer [`connect_established`].
    Connect,
    /// Any other method with an `http://` absolute-form target: send
    /// [`ProxyRequest::upstream_head`] to the origin, then splice.
    Forward,
}

/// A parsed proxy request head.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyRequest {
    pub method: Method,
    /// The host as written: a name, a dotted quad, or an IPv6 literal without
    /// brackets. Not validated beyond syntax here (the policy does that), but
    /// only ever contains ASCII letters, digits, `-`, `.`, `_` (names and IPv4)
    /// or a literal that parses as [`Ipv6Addr`], at most 255 bytes.
    pub host: String,
    pub port: u16,
    /// For [`Method::Forward`] only: the head to send upstream (origin-form
    /// request line plus cleaned headers, ending `"\r\n\r\n"`); empty for
    /// [`Method::Connect`].
    pub upstream_head: Vec<u8>,
}

// Hand-written so that logging a request never prints the client's
// Authorization or Cookie headers, which sit in `upstream_head`.
impl fmt::Debug for ProxyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyRequest")
            .field("method", &self.method)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("upstream_head_len", &self.upstream_head.len())
            .finish()
    }
}

/// Why no request head could be read. Messages never quote guest bytes, so
/// they are safe to log and to send back as a reply body.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("request head exceeds {MAX_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("connection closed before a complete request head")]
    Closed,
    #[error("reading request head: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed proxy request: {0}")]
    Malformed(String),
    #[error(
        "unsupported scheme {0:?} in an absolute-form request target: only http:// \
         is proxied that way; use CONNECT for https"
    )]
    UnsupportedScheme(String),
}

impl HeadError {
    /// The HTTP status to answer with, or `None` when the peer is gone.
    pub fn status(&self) -> Option<(u16, &'static str)> {
        match self {
            HeadError::TooLarge => Some((431, "Request Header Fields Too Large")),
            HeadError::Malformed(_) => Some((400, "Bad Request")),
            HeadError::UnsupportedScheme(_) => Some((501, "Not Implemented")),
            HeadError::Closed | HeadError::Io(_) => None,
        }
    }

    /// A complete [`reply`] for this error (the message as its body), or
    /// `None` when the peer is gone.
    pub fn response(&self) -> Option<Vec<u8>> {
        self.status()
            .map(|(status, reason)| reply(status, reason, &self.to_string()))
    }
}

fn malformed(why: impl Into<String>) -> HeadError {
    HeadError::Malformed(why.into())
}

/// Reads one request head (bounded by [`MAX_HEAD_BYTES`]; a timeout is the
/// caller's job) and returns it parsed, plus any bytes read past the head
/// (request body start, or the first TLS bytes a client sent early after
/// CONNECT) which must be forwarded upstream first.
pub async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<(ProxyRequest, Vec<u8>), HeadError> {
    // One fixed allocation: the cap on what the guest can make us hold.
    let mut buf = vec![0u8; MAX_HEAD_BYTES];
    let mut filled = 0;
    let mut checked = 0;
    loop {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        // The terminator may straddle two reads.
        let search_from = filled.saturating_sub(3);
        filled += n;
        if let Some(pos) = find(&buf[search_from..filled], b"\r\n\r\n") {
            let head_len = search_from + pos;
            let request = parse_head(&buf[..head_len])?;
            let leftover = buf[head_len + 4..filled].to_vec();
            return Ok((request, leftover));
        }
        checked = early_check(&buf[..filled], checked)?;
        if filled == buf.len() {
            return Err(HeadError::TooLarge);
        }
    }
}

/// Cheap incremental checks on a head still being received, so that a client
/// speaking something else is refused at once instead of after 16 KiB or a
/// timeout. Checks `buf[from..]` and returns where to resume; `parse_head`
/// re-validates everything once the head is complete.
fn early_check(buf: &[u8], from: usize) -> Result<usize, HeadError> {
    let prefix = &buf[..buf.len().min(MAX_METHOD_LEN + 1)];
    let letters = prefix.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if letters > MAX_METHOD_LEN
        || (letters < prefix.len() && (letters == 0 || prefix[letters] != b' '))
    {
        return Err(malformed("request does not start with an HTTP method"));
    }
    let mut i = from;
    while i < buf.len() {
        match buf[i] {
            b'\r' => match buf.get(i + 1) {
                // Its LF may be in the next read: resume here.
                None => return Ok(i),
                Some(b'\n') => i += 2,
                Some(_) => return Err(malformed("bare CR in request head")),
            },
            // A CR before it would have consumed it above.
            b'\n' => return Err(malformed("bare LF line ending (CRLF required)")),
            b'\t' => i += 1,
            b if b < 0x20 || b == 0x7f => {
                return Err(malformed("control byte in request head"));
            }
            _ => i += 1,
        }
    }
    Ok(i)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One header line, borrowed from the head.
struct Field<'a> {
    name: &'a [u8],
    value: &'a [u8],
}

impl Field<'_> {
    fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name.as_bytes())
    }
}

/// Parses a complete head, given without its final `"\r\n\r\n"`.
fn parse_head(head: &[u8]) -> Result<ProxyRequest, HeadError> {
    let mut lines = split_lines(head)?.into_iter();
    let request_line = lines.next().unwrap_or_default();
    let RequestLine {
        method,
        target,
        version,
    } = parse_request_line(request_line)?;

    let mut fields = Vec::new();
    for line in lines {
        if fields.len() == MAX_HEADERS {
            return Err(malformed(format!("more than {MAX_HEADERS} header fields")));
        }
        fields.push(parse_field(line)?);
    }
    check_framing(&fields)?;

    if method == b"CONNECT" {
        let (host, port) = parse_authority(target, None)?;
        // Headers (Proxy-Authorization included) are dropped: nothing of a
        // CONNECT head goes upstream.
        return Ok(ProxyRequest {
            method: Method::Connect,
            host,
            port,
            upstream_head: Vec::new(),
        });
    }

    let target = parse_absolute_target(target)?;
    let origin_form: Vec<u8> = match target.path {
        [] if method == b"OPTIONS" => b"*".to_vec(), // RFC 9112 §3.2.4
        [] => b"/".to_vec(),
        [b'?', ..] => [b"/", target.path].concat(),
        path => path.to_vec(),
    };
    let upstream_head = build_upstream_head(
        method,
        &origin_form,
        version,
        &fields,
        &authority(&target.host, target.port),
    );
    Ok(ProxyRequest {
        method: Method::Forward,
        host: target.host,
        port: target.port,
        upstream_head,
    })
}

/// Splits on CRLF, refusing bare LF (stray CRs are refused later as control
/// bytes inside a line).
fn split_lines(head: &[u8]) -> Result<Vec<&[u8]>, HeadError> {
    let mut lines: Vec<&[u8]> = head.split(|&b| b == b'\n').collect();
    let last = lines.len() - 1;
    for line in &mut lines[..last] {
        match line.strip_suffix(b"\r") {
            Some(stripped) => *line = stripped,
            None => return Err(malformed("bare LF line ending (CRLF required)")),
        }
    }
    Ok(lines)
}

struct RequestLine<'a> {
    method: &'a [u8],
    target: &'a [u8],
    version: &'a [u8],
}

/// `METHOD SP TARGET SP HTTP/1.x`, with exactly one space between parts.
fn parse_request_line(line: &[u8]) -> Result<RequestLine<'_>, HeadError> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed(
            "request line is not METHOD SP TARGET SP HTTP-VERSION",
        ));
    };
    if method.is_empty()
        || method.len() > MAX_METHOD_LEN
        || !method.iter().all(u8::is_ascii_uppercase)
    {
        return Err(malformed(format!(
            "method is not 1-{MAX_METHOD_LEN} uppercase ASCII letters"
        )));
    }
    if target.is_empty() || !target.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(malformed("request target is empty or not visible ASCII"));
    }
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        return Err(malformed("HTTP version is not HTTP/1.0 or HTTP/1.1"));
    }
    Ok(RequestLine {
        method,
        target,
        version,
    })
}

fn parse_field(line: &[u8]) -> Result<Field<'_>, HeadError> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err(malformed("obsolete header line folding"));
    }
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return Err(malformed("header line without ':'"));
    };
    let name = &line[..colon];
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(malformed("header name is not an HTTP token"));
    }
    let value = trim_ows(&line[colon + 1..]);
    if !value
        .iter()
        .all(|&b| b == b'\t' || (0x20..=0x7e).contains(&b) || b >= 0x80)
    {
        return Err(malformed("control byte in a header value"));
    }
    Ok(Field { name, value })
}

/// RFC 9110 §5.6.2 tchar.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Refuses heads that two HTTP parsers could frame differently (RFC 9112
/// §6.3), and more than one Host (RFC 9112 §3.2).
fn check_framing(fields: &[Field<'_>]) -> Result<(), HeadError> {
    let mut content_length: Option<&[u8]> = None;
    let mut transfer_encoding = false;
    let mut hosts = 0;
    for field in fields {
        if field.is("content-length") {
            let value = field.value;
            if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
                return Err(malformed("Content-Length is not a decimal number"));
            }
            match content_length {
                Some(seen) if seen != value => {
                    return Err(malformed("differing Content-Length values"));
                }
                _ => content_length = Some(value),
            }
        } else if field.is("transfer-encoding") {
            transfer_encoding = true;
        } else if field.is("host") {
            hosts += 1;
        }
    }
    if content_length.is_some() && transfer_encoding {
        return Err(malformed("both Content-Length and Transfer-Encoding"));
    }
    if hosts > 1 {
        return Err(malformed("more than one Host header"));
    }
    Ok(())
}

/// `host:port` or `[v6]:port`; the port may be omitted only when
/// `default_port` is given.
fn parse_authority(auth: &[u8], default_port: Option<u16>) -> Result<(String, u16), HeadError> {
    let (host, rest) = if let Some(bracketed) = auth.strip_prefix(b"[") {
        let Some(close) = bracketed.iter().position(|&b| b == b']') else {
            return Err(malformed("unterminated IPv6 literal"));
        };
        let literal = &bracketed[..close];
        let is_v6 = std::str::from_utf8(literal)
            .ok()
            .and_then(|s| s.parse::<Ipv6Addr>().ok())
            .is_some();
        if !is_v6 {
            return Err(malformed("invalid IPv6 literal"));
        }
        (literal, &bracketed[close + 1..])
    } else {
        let end = auth.iter().position(|&b| b == b':').unwrap_or(auth.len());
        let host = &auth[..end];
        if host.is_empty() || host.len() > MAX_HOST_LEN {
            return Err(malformed(format!(
                "host is empty or longer than {MAX_HOST_LEN} bytes"
            )));
        }
        // Deliberately narrower than RFC 3986 reg-name (no percent-encoding,
        // no sub-delims): nothing a real client needs, and keeps the policy's
        // input trivially safe.
        if !host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            return Err(malformed("host has characters outside [A-Za-z0-9._-]"));
        }
        (host, &auth[end..])
    };
    let port = match (rest, default_port) {
        ([], Some(port)) => port,
        ([], None) => return Err(malformed("port required")),
        ([b':', digits @ ..], _) => parse_port(digits)?,
        _ => return Err(malformed("junk after the host")),
    };
    // Every byte was checked to be ASCII above.
    let host = String::from_utf8_lossy(host).into_owned();
    Ok((host, port))
}

fn parse_port(digits: &[u8]) -> Result<u16, HeadError> {
    if digits.is_empty() || digits.len() > 5 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(malformed("port is not 1-5 decimal digits"));
    }
    let port = digits
        .iter()
        .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
    match u16::try_from(port) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(malformed("port out of range 1-65535")),
    }
}

struct AbsoluteTarget<'a> {
    host: String,
    port: u16,
    /// Path and query as written, possibly empty or starting with '?'.
    path: &'a [u8],
}

/// `http://host[:port][/path][?query]`, scheme case-insensitive.
fn parse_absolute_target(target: &[u8]) -> Result<AbsoluteTarget<'_>, HeadError> {
    let Some(scheme_end) = find(target, b"://") else {
        return Err(malformed(if target.starts_with(b"/") {
            "origin-form request target: a proxy request needs http://host/path"
        } else {
            "request target is not absolute-form (http://host/path)"
        }));
    };
    let scheme = &target[..scheme_end];
    let scheme_ok = matches!(scheme.first(), Some(b) if b.is_ascii_alphabetic())
        && scheme.len() <= MAX_SCHEME_LEN
        && scheme
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !scheme_ok {
        return Err(malformed("invalid URI scheme"));
    }
    if !scheme.eq_ignore_ascii_case(b"http") {
        let scheme = String::from_utf8_lossy(scheme).to_ascii_lowercase();
        return Err(HeadError::UnsupportedScheme(scheme));
    }
    if target.contains(&b'#') {
        return Err(malformed("fragment in request target"));
    }
    let rest = &target[scheme_end + 3..];
    let authority_end = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?')
        .unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    if authority.contains(&b'@') {
        return Err(malformed("userinfo in request target"));
    }
    let (host, port) = parse_authority(authority, Some(80))?;
    Ok(AbsoluteTarget {
        host,
        port,
        path: &rest[authority_end..],
    })
}

/// The Host value for an http:// URI: IPv6 bracketed, port only when not 80.
fn authority(host: &str, port: u16) -> String {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    if port == 80 {
        host
    } else {
        format!("{host}:{port}")
    }
}

/// Hop-by-hop fields that never go upstream (RFC 9110 §7.6.1), plus the
/// proxy credentials meant for us.
const DROPPED: [&str; 4] = [
    "proxy-connection",
    "proxy-authorization",
    "connection",
    "keep-alive",
];

/// Fields a client cannot remove by naming them in `Connection`: dropping the
/// framing fields would make the origin read the body as a new request.
const NOT_NOMINABLE: [&str; 2] = ["content-length", "transfer-encoding"];

fn build_upstream_head(
    method: &[u8],
    origin_form: &[u8],
    version: &[u8],
    fields: &[Field<'_>],
    host_value: &str,
) -> Vec<u8> {
    let nominated: Vec<&[u8]> = fields
        .iter()
        .filter(|f| f.is("connection"))
        .flat_map(|f| f.value.split(|&b| b == b','))
        .map(trim_ows)
        .filter(|name| !name.is_empty())
        .collect();
    let dropped = |f: &Field<'_>| {
        DROPPED.iter().any(|name| f.is(name))
            || (nominated
                .iter()
                .any(|name| f.name.eq_ignore_ascii_case(name))
                && !NOT_NOMINABLE.iter().any(|name| f.is(name)))
    };

    let mut out = Vec::with_capacity(MAX_HEAD_BYTES / 4);
    out.extend_from_slice(method);
    out.push(b' ');
    out.extend_from_slice(origin_form);
    out.push(b' ');
    // The client's version, not ours: the origin's response is spliced back
    // unmodified, so an HTTP/1.0 client must not be sent chunked encoding.
    out.extend_from_slice(version);
    out.extend_from_slice(b"\r\n");

    // The URI's authority always wins over the client's Host (RFC 9112
    // §3.2.2); it keeps the client's Host position when there is one.
    let has_host = fields.iter().any(|f| f.is("host"));
    if !has_host {
        push_field(&mut out, b"Host", host_value.as_bytes());
    }
    let mut content_length_sent = false;
    for field in fields {
        if field.is("host") {
            push_field(&mut out, field.name, host_value.as_bytes());
        } else if field.is("content-length") {
            // Identical duplicates were allowed by check_framing; send one.
            if !content_length_sent {
                push_field(&mut out, field.name, field.value);
                content_length_sent = true;
            }
        } else if !dropped(field) {
            push_field(&mut out, field.name, field.value);
        }
    }
    // One request per proxy connection: the origin closes after answering.
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A complete short HTTP/1.1 response with a text/plain body (`body` plus a
/// newline). Control characters in `reason` become spaces so a caller's
/// message cannot break the status line.
pub fn reply(status: u16, reason: &str, body: &str) -> Vec<u8> {
    let reason: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let content_length = body.len() + 1;
    format!(
        "HTTP/1.1 {status} {reason}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {content_length}\r\n\
         Connection: close\r\n\
         Proxy-Agent: airlock\r\n\
         \r\n\
         {body}\n"
    )
    .into_bytes()
}

/// The reply to a CONNECT once the upstream connection is open.
pub fn connect_established() -> Vec<u8> {
    b"HTTP/1.1 200 Connection established\r\nProxy-Agent: airlock\r\n\r\n".to_vec()
}

#[cfg(test)]
mod tests;
