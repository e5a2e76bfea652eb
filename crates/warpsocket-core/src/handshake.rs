//! The HTTP/1.1 upgrade (RFC 6455 §4.2), sans-I/O: bytes in, a request or the
//! HTTP error to answer with out. Parsing is httparse's; the accept key is
//! tungstenite's.
//!
//! Sans-I/O: the upgrade does the I/O around it.

use tungstenite::handshake::derive_accept_key;

/// Most header lines a request may carry.
const MAX_HEADERS: usize = 64;

/// A valid upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// The request target: path and query, e.g. `/chat?room=7`.
    pub path: String,
    /// Header names in lower case; repeated headers joined with ", ".
    pub headers: Vec<(String, String)>,
    /// Value for the `Sec-WebSocket-Accept` response header.
    pub accept: String,
}

/// HTTP statuses an upgrade request is refused with: by the handshake, and
/// through `resolve_open` by the Python layer (403 when `handle_open`
/// refuses, 500 when it fails).
pub mod status {
    /// Defines each status and [`ALL`], from which the response line takes
    /// its reason phrase and `warpsocket.RefusalStatus` is made.
    macro_rules! statuses {
        ($($name:ident = $status:literal $phrase:literal,)*) => {
            $(pub const $name: u16 = $status;)*
            /// Every status above: its name, number and reason phrase.
            pub const ALL: &[(&str, u16, &str)] = &[$((stringify!($name), $name, $phrase)),*];
        };
    }

    statuses! {
        BAD_REQUEST = 400 "Bad Request",
        FORBIDDEN = 403 "Forbidden",
        UPGRADE_REQUIRED = 426 "Upgrade Required",
        TOO_MANY_REQUESTS = 429 "Too Many Requests",
        HEADERS_TOO_LARGE = 431 "Request Header Fields Too Large",
        INTERNAL_ERROR = 500 "Internal Server Error",
        UNAVAILABLE = 503 "Service Unavailable",
    }
}

/// An HTTP answer that ends the connection instead of upgrading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
}

impl Refusal {
    pub const fn new(status: u16, reason: &'static str) -> Self {
        Refusal { status, reason }
    }
}

pub const TOO_LARGE: Refusal = Refusal::new(status::HEADERS_TOO_LARGE, "request headers too large");
/// The answer to a plain HTTP request when no static files are served.
pub const WEBSOCKET_ONLY: Refusal = Refusal::new(
    status::UPGRADE_REQUIRED,
    "this endpoint only speaks WebSocket",
);

/// A complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Upgrade(Upgrade),
    /// A plain HTTP request (no `Upgrade: websocket`): a static file, or 426.
    Plain {
        method: String,
        path: String,
        headers: Vec<(String, String)>,
    },
}

/// Tries to parse a complete request from `buf`.
/// `Ok(None)`: need more bytes. `Ok(Some((request, used)))`: `used` bytes were the request.
pub fn parse(buf: &[u8]) -> Result<Option<(Request, usize)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(TOO_LARGE),
        Err(_) => return Err(Refusal::new(status::BAD_REQUEST, "malformed HTTP request")),
    };
    let path = req.path.unwrap_or("/").to_owned();
    let mut pairs: Vec<(String, String)> = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        let value = String::from_utf8_lossy(h.value).trim().to_owned();
        match pairs.iter_mut().find(|(n, _)| *n == name) {
            Some((_, existing)) => {
                existing.push_str(", ");
                existing.push_str(&value);
            }
            None => pairs.push((name, value)),
        }
    }
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let has_token = |name: &str, token: &str| {
        get(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("upgrade", "websocket") {
        let method = req.method.unwrap_or("").to_owned();
        return Ok(Some((
            Request::Plain {
                method,
                path,
                headers: pairs,
            },
            used,
        )));
    }
    if req.method != Some("GET") || req.version != Some(1) {
        return Err(Refusal::new(
            status::BAD_REQUEST,
            "a WebSocket upgrade must be an HTTP/1.1 GET",
        ));
    }
    if !has_token("connection", "upgrade") {
        return Err(Refusal::new(
            status::BAD_REQUEST,
            "missing 'Connection: upgrade'",
        ));
    }
    let Some(key) = get("sec-websocket-key").filter(|k| !k.is_empty()) else {
        return Err(Refusal::new(
            status::BAD_REQUEST,
            "missing Sec-WebSocket-Key",
        ));
    };
    if !is_key(key) {
        return Err(Refusal::new(
            status::BAD_REQUEST,
            "Sec-WebSocket-Key is not base64 of 16 bytes",
        ));
    }
    match get("sec-websocket-version") {
        Some("13") => {}
        None => {
            return Err(Refusal::new(
                status::BAD_REQUEST,
                "missing Sec-WebSocket-Version",
            ))
        }
        Some(_) => {
            return Err(Refusal::new(
                status::UPGRADE_REQUIRED,
                "unsupported Sec-WebSocket-Version",
            ))
        }
    }
    let accept = derive_accept_key(key.as_bytes());
    let upgrade = Upgrade {
        path,
        headers: pairs,
        accept,
    };
    Ok(Some((Request::Upgrade(upgrade), used)))
}

/// Whether the header block may have ended in the bytes from `from` on:
/// an empty line (`\r\n\r\n`, or the bare `\n\n` httparse also takes)
/// in them or straddling the bytes before them. Only then can [`parse`]
/// find more than before.
pub fn may_end_head(buf: &[u8], from: usize) -> bool {
    let window = &buf[from.saturating_sub(2).min(buf.len())..];
    window.windows(2).any(|w| w == b"\n\n") || window.windows(3).any(|w| w == b"\n\r\n")
}

/// RFC 6455 §4.2.1: the key is base64 of 16 bytes, which is 22 base64
/// digits and `==`.
fn is_key(key: &str) -> bool {
    let key = key.as_bytes();
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

/// The `101 Switching Protocols` response, with the agreed
/// `Sec-WebSocket-Extensions` value if an extension was negotiated.
pub fn accept_response(upgrade: &Upgrade, extensions: Option<&str>) -> Vec<u8> {
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        upgrade.accept
    );
    if let Some(extensions) = extensions {
        response.push_str("Sec-WebSocket-Extensions: ");
        response.push_str(extensions);
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    response.into_bytes()
}

/// A complete HTTP error response that closes the connection.
pub fn refusal_response(refusal: Refusal) -> Vec<u8> {
    let status_text = status::ALL
        .iter()
        .find(|&&(_, status, _)| status == refusal.status)
        .map_or("Error", |&(_, _, phrase)| phrase);
    let extra = if refusal.status == status::UPGRADE_REQUIRED {
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    } else {
        ""
    };
    let body = format!("{}\n", refusal.reason);
    format!(
        "HTTP/1.1 {} {}\r\n{}Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        refusal.status,
        status_text,
        extra,
        body.len(),
        body
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /chat?room=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Multi: a\r\nx-multi: b\r\n\r\n";

    #[test]
    fn parses_a_valid_upgrade() {
        let (request, used) = parse(GOOD.as_bytes()).unwrap().unwrap();
        let Request::Upgrade(up) = request else {
            panic!("not an upgrade")
        };
        assert_eq!(used, GOOD.len());
        assert_eq!(up.path, "/chat?room=7");
        assert_eq!(up.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert!(up.headers.contains(&("x-multi".into(), "a, b".into())));
        assert!(up.headers.contains(&("host".into(), "x".into())));
    }

    #[test]
    fn waits_for_the_whole_request() {
        assert_eq!(parse(&GOOD.as_bytes()[..40]), Ok(None));
    }

    #[test]
    fn refuses_bad_requests_with_the_right_status() {
        let status = |req: &str| parse(req.as_bytes()).unwrap_err().status;
        assert_eq!(status("\x16\x03\x01garbage\r\n\r\n"), 400);
        assert_eq!(
            status(&GOOD.replace("keep-alive, Upgrade", "keep-alive")),
            400
        );
        assert_eq!(status(&GOOD.replace("Sec-WebSocket-Key", "X-Key")), 400);
        assert_eq!(status(&GOOD.replace("Version: 13", "Version: 8")), 426);
        assert_eq!(
            status(&GOOD.replace("Sec-WebSocket-Version", "X-Version")),
            400
        );
        for key in [
            "dGhlIHNhbXBsZSBub25jZQ",   // unpadded
            "dGhlIHNhbXBsZSBub25jZQ=",  // short padding
            "dGhlIHNhbXBsZSBub25jZTE=", // 17 bytes
            "dGhlIHNhbXBsZSBub25j",     // 15 bytes
            "dGhlIHNhbXBsZSBub2*jZQ==", // not base64
            "not a key",
        ] {
            let request = GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", key);
            assert_eq!(status(&request), 400, "{key}");
        }
        assert_eq!(status(&GOOD.replace("GET", "POST")), 400);
        let many: String = (0..70).map(|i| format!("h{i}: v\r\n")).collect();
        assert_eq!(status(&format!("GET / HTTP/1.1\r\n{many}\r\n")), 431);
    }

    #[test]
    fn the_head_may_end_only_at_an_empty_line() {
        let request = GOOD.as_bytes();
        let end = request.len();
        // Each split of the final empty line is seen from either side.
        for cut in end - 4..=end {
            let (head, tail) = request.split_at(cut);
            let mut buf = head.to_vec();
            let saw_it_before = may_end_head(&buf, 0);
            buf.extend_from_slice(tail);
            assert!(saw_it_before || may_end_head(&buf, cut), "cut at {cut}");
        }
        // Byte by byte, only the last byte can end it.
        let ends: Vec<usize> = (1..=end)
            .filter(|&n| may_end_head(&request[..n], n - 1))
            .collect();
        assert_eq!(ends, [end]);
        assert!(may_end_head(b"GET / HTTP/1.1\nHost: x\n\n", 20));
        assert!(!may_end_head(b"GET / HTTP/1.1\r\nHost: x\r\n", 10));
    }

    #[test]
    fn a_request_without_upgrade_is_plain() {
        let (request, _) = parse(b"HEAD /a%20b?x=1 HTTP/1.0\r\nIf-None-Match: \"e\"\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            request,
            Request::Plain {
                method: "HEAD".into(),
                path: "/a%20b?x=1".into(),
                headers: vec![("if-none-match".into(), "\"e\"".into())],
            }
        );
    }

    #[test]
    fn version_426_names_the_supported_version() {
        let text = String::from_utf8(refusal_response(Refusal::new(426, "x"))).unwrap();
        assert!(text.starts_with("HTTP/1.1 426 "));
        assert!(text.contains("Sec-WebSocket-Version: 13\r\n"));
    }
}
