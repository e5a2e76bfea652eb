//! `warpsocket-bench`: the load generator for the performance workload.
//!
//! `--mode sub` (the default, the workload of `examples/performance`): each of
//! `--connections` clients opens a WebSocket, sends `{"type":"sub"}`, waits for
//! `{"type":"sub-ack","ch":NAME}`, and then, once every client is connected, loops:
//! send `{"type":"req","channel":NAME}`, read frames (the channel's `evt` broadcasts)
//! until `{"type":"ack"}` arrives, send the next request.
//!
//! `--mode echo` (for servers that answer every message with one message, e.g.
//! `benchmarks/parallel_cpu.py`): each client keeps `--in-flight` copies of `--message`
//! outstanding; every message received counts as the reply ("ack") to the oldest one
//! outstanding and sends the next.
//!
//! With `--tls-ca FILE` (or `--insecure`, for benchmarking only) every connection speaks
//! TLS (`wss://`, rustls with ring, as the server) before its upgrade.
//!
//! `--compression` offers permessage-deflate the way Chromium does; where the server
//! agrees, compressed server messages are inflated before they are read. The clients'
//! own messages go out uncompressed (RFC 7692 allows it). The output then also says how
//! many connections negotiated it.
//!
//! `--rate R` (sub mode) runs the workload open loop: R requests per second in all,
//! spread evenly over the connections (each sends every `connections / R` seconds, the
//! connections' schedules staggered), whether or not earlier requests were answered.
//! Latency is measured from the time a request was *scheduled*, not the time it could be
//! sent, so a server that falls behind cannot hide its queue (no coordinated omission).
//!
//! After `--warmup` seconds a measurement window of `--duration` seconds counts acks,
//! received frames and the request→ack latency. One JSON line with the figures goes to
//! stdout; progress and the `WINDOW_START` / `WINDOW_END` markers (for a runner that
//! samples the server) go to stderr.
//!
//! Everything runs on one single-threaded tokio runtime (the benchmark pins the generator
//! to one core), so shared counters are plain `Cell`s. Client frames are encoded and
//! masked by hand and server frames are parsed by a minimal parser: no allocation per
//! frame on the hot path.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

const USAGE: &str = "\
usage: warpsocket-bench [options]
  --host IP             server IPv4 address (default 127.0.0.1)
  --port P | P1-P2      server port(s); repeatable; connections are spread round-robin
  --connections N       number of client connections (default 1000)
  --source-ips N        bind clients to 127.0.0.1 .. 127.0.0.N round-robin (default 8)
  --batch N             connections opened concurrently per batch (default 500)
  --warmup S            seconds of load before the window (default 3)
  --duration S          measurement window in seconds (default 10)
  --connect-timeout S   per-connection limit for connect + upgrade + sub-ack (default 20)
  --path PATH           request target of the upgrade (default /)
  --mode sub|echo       sub: the performance workload (default); echo: every message
                        received answers the oldest one outstanding
  --message TEXT        echo mode: the text message sent (default 16 x's)
  --in-flight N         echo mode: messages outstanding per connection (default 1)
  --tls-ca FILE         speak TLS (wss://), trusting the PEM CA certificates in FILE
  --tls-name NAME       the server name TLS checks the certificate for (default localhost)
  --insecure            speak TLS without checking the certificate (benchmarking only)
  --compression         offer permessage-deflate and inflate compressed replies
  --rate R              sub mode, open loop: R requests/s in all, spread evenly over
                        the connections; latency from each request's scheduled time";

/// Which workload the clients run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Subscribe, then request/broadcast/ack (the performance workload).
    Sub,
    /// Send a message, wait for one back.
    Echo,
}

/// Command line options.
#[derive(Clone, Debug)]
struct Config {
    host: Ipv4Addr,
    ports: Vec<u16>,
    connections: usize,
    source_ips: usize,
    batch: usize,
    warmup: Duration,
    duration: Duration,
    connect_timeout: Duration,
    path: String,
    mode: Mode,
    message: String,
    in_flight: usize,
    tls: Option<Tls>,
    compression: bool,
    /// Open loop: requests per second over all connections (closed loop when `None`).
    rate: Option<f64>,
}

/// The TLS client every connection uses.
#[derive(Clone)]
struct Tls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tls({:?})", self.name)
    }
}

/// Whose certificates the TLS client accepts.
enum Trust {
    /// Those issued by the CAs of a PEM file.
    Ca(String),
    /// Any: the certificate is not checked (benchmarking only).
    Insecure,
}

fn tls_client(trust: Trust, name: &str) -> Result<Tls> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let mut config = match trust {
        Trust::Ca(path) => {
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(&path)
                .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| format!("--tls-ca {path}: {e}"))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("--tls-ca {path}: {e}"))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(name.to_string()).map_err(|e| format!("--tls-name: {e}"))?;
    Ok(Tls {
        connector: TlsConnector::from(Arc::new(config)),
        name,
    })
}

/// `--insecure`: accepts any certificate, but still checks the handshake's signatures
/// so the server does the same work as with a verified certificate.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client connection's byte stream: plain TCP or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

fn parse_args() -> Result<Config> {
    parse_args_from(std::env::args().skip(1))
}

fn parse_args_from<I, S>(argv: I) -> Result<Config>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut cfg = Config {
        host: Ipv4Addr::LOCALHOST,
        ports: Vec::new(),
        connections: 1000,
        source_ips: 8,
        batch: 500,
        warmup: Duration::from_secs(3),
        duration: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(20),
        path: "/".to_string(),
        mode: Mode::Sub,
        message: "x".repeat(16),
        in_flight: 1,
        tls: None,
        compression: false,
        rate: None,
    };
    let mut trust = None;
    let mut tls_name = "localhost".to_string();
    let mut args = argv.into_iter().map(Into::into);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        if flag == "--insecure" {
            trust = Some(Trust::Insecure);
            continue;
        }
        if flag == "--compression" {
            cfg.compression = true;
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |what: &str| format!("{flag}: {what}, got {value:?}");
        match flag.as_str() {
            "--host" => cfg.host = value.parse().map_err(|_| bad("expected an IPv4 address"))?,
            "--port" => {
                if let Some((a, b)) = value.split_once('-') {
                    let a: u16 = a.parse().map_err(|_| bad("expected P or P1-P2"))?;
                    let b: u16 = b.parse().map_err(|_| bad("expected P or P1-P2"))?;
                    if a > b {
                        return Err(bad("empty port range"));
                    }
                    cfg.ports.extend(a..=b);
                } else {
                    cfg.ports
                        .push(value.parse().map_err(|_| bad("expected a port"))?);
                }
            }
            "--connections" => {
                cfg.connections = value.parse().map_err(|_| bad("expected a count"))?
            }
            "--source-ips" => {
                cfg.source_ips = value.parse().map_err(|_| bad("expected a count"))?;
                if !(1..=254).contains(&cfg.source_ips) {
                    return Err(bad("expected 1..=254"));
                }
            }
            "--batch" => {
                cfg.batch = value.parse().map_err(|_| bad("expected a count"))?;
                if cfg.batch == 0 {
                    return Err(bad("expected at least 1"));
                }
            }
            "--warmup" => cfg.warmup = parse_secs(&value).ok_or_else(|| bad("expected seconds"))?,
            "--duration" => {
                cfg.duration = parse_secs(&value).ok_or_else(|| bad("expected seconds"))?
            }
            "--connect-timeout" => {
                cfg.connect_timeout = parse_secs(&value).ok_or_else(|| bad("expected seconds"))?
            }
            "--path" => cfg.path = value,
            "--mode" => {
                cfg.mode = match value.as_str() {
                    "sub" => Mode::Sub,
                    "echo" => Mode::Echo,
                    _ => return Err(bad("expected sub or echo")),
                }
            }
            "--message" => cfg.message = value,
            "--in-flight" => {
                cfg.in_flight = value.parse().map_err(|_| bad("expected a count"))?;
                if cfg.in_flight == 0 {
                    return Err(bad("expected at least 1"));
                }
            }
            "--tls-ca" => trust = Some(Trust::Ca(value)),
            "--tls-name" => tls_name = value,
            "--rate" => {
                let rate: f64 = value.parse().map_err(|_| bad("expected requests/s"))?;
                if !(rate.is_finite() && rate > 0.0) {
                    return Err(bad("expected a positive rate"));
                }
                cfg.rate = Some(rate);
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if cfg.ports.is_empty() {
        return Err("at least one --port is required".to_string());
    }
    if cfg.rate.is_some() && cfg.mode != Mode::Sub {
        return Err("--rate needs --mode sub".to_string());
    }
    if let Some(trust) = trust {
        cfg.tls = Some(tls_client(trust, &tls_name)?);
    }
    Ok(cfg)
}

fn parse_secs(s: &str) -> Option<Duration> {
    let v: f64 = s.parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| Duration::from_secs_f64(v))
}

/// Counters shared by every connection task. Single-threaded runtime: `Cell`s suffice.
struct Shared {
    /// True only inside the measurement window; counters move only then.
    measuring: Cell<bool>,
    acks: Cell<u64>,
    frames: Cell<u64>,
    /// Requests sent in the window (open loop: to compare with the offered rate).
    sent: Cell<u64>,
    /// Connections that failed to connect, upgrade or subscribe, or broke during the run.
    errors: Cell<u64>,
    /// First few error messages, printed to stderr to tell what went wrong.
    error_samples: RefCell<Vec<String>>,
    /// Request→ack latency in microseconds.
    latency_us: RefCell<Histogram<u64>>,
    /// Bytes of server frames (headers included) received in the window.
    wire_bytes: Cell<u64>,
    /// Connections whose server agreed to permessage-deflate.
    deflating: Cell<u64>,
    /// One inflater for every connection: the server compresses without context
    /// takeover, so each message inflates on its own.
    inflater: RefCell<flate2::Decompress>,
    inflated: RefCell<Vec<u8>>,
}

impl Shared {
    fn error(&self, msg: String) {
        self.errors.set(self.errors.get() + 1);
        let mut samples = self.error_samples.borrow_mut();
        if samples.len() < 5 {
            samples.push(msg);
        }
    }
}

type Result<T> = std::result::Result<T, String>;

/// What a complete server message is, judging by its `"type"` field.
#[derive(Debug, PartialEq)]
enum Kind {
    Evt,
    Ack,
    SubAck(String),
    Other,
}

/// A server frame the connection loop has to act on.
enum Event {
    Message(Kind),
    Ping(Vec<u8>),
}

/// The value of the JSON string field `"name"` in `text`, tolerant of whitespace.
/// Enough for the flat objects of this workload (no escapes in the values we read).
fn json_str_field<'a>(text: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut i = 0;
    while i + name.len() + 2 <= text.len() {
        let rest = &text[i..];
        if rest[0] == b'"' && rest[1..].starts_with(name) && rest.get(1 + name.len()) == Some(&b'"')
        {
            let mut j = i + name.len() + 2;
            while j < text.len() && text[j].is_ascii_whitespace() {
                j += 1;
            }
            if text.get(j) != Some(&b':') {
                i += 1;
                continue;
            }
            j += 1;
            while j < text.len() && text[j].is_ascii_whitespace() {
                j += 1;
            }
            if text.get(j) != Some(&b'"') {
                return None;
            }
            let start = j + 1;
            let len = text[start..].iter().position(|&b| b == b'"')?;
            return Some(&text[start..start + len]);
        }
        i += 1;
    }
    None
}

fn classify(payload: &[u8]) -> Kind {
    match json_str_field(payload, b"type") {
        Some(b"evt") => Kind::Evt,
        Some(b"ack") => Kind::Ack,
        Some(b"sub-ack") => match json_str_field(payload, b"ch") {
            Some(ch) => Kind::SubAck(String::from_utf8_lossy(ch).into_owned()),
            None => Kind::Other,
        },
        _ => Kind::Other,
    }
}

/// Encodes one masked client frame (FIN set) into `out`.
fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.clear();
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
}

/// One client connection: the stream, its read buffer, and reusable scratch space.
struct Conn {
    stream: Stream,
    shared: Rc<Shared>,
    /// The server agreed to permessage-deflate: RSV1 marks compressed messages.
    deflate: bool,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Payload of a fragmented message being assembled (servers here rarely fragment).
    fragments: Vec<u8>,
    fragmenting: bool,
    out: Vec<u8>,
    rng: u32,
}

impl Conn {
    fn new(stream: Stream, shared: Rc<Shared>, seed: u32) -> Self {
        Conn {
            stream,
            shared,
            deflate: false,
            buf: vec![0; 4096],
            start: 0,
            end: 0,
            fragments: Vec::new(),
            fragmenting: false,
            out: Vec::with_capacity(64),
            rng: seed | 1,
        }
    }

    fn next_mask(&mut self) -> [u8; 4] {
        // xorshift32: masks only need to vary, not to be cryptographically strong here.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.rng = x;
        x.to_ne_bytes()
    }

    async fn send(&mut self, opcode: u8, payload: &[u8]) -> Result<()> {
        let mask = self.next_mask();
        let mut out = std::mem::take(&mut self.out);
        encode_frame(&mut out, opcode, payload, mask);
        let res = self.stream.write_all(&out).await;
        self.out = out;
        res.map_err(|e| format!("write: {e}"))
    }

    /// Reads more bytes into the buffer, making room first. Errors on EOF.
    async fn fill(&mut self) -> Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let len = self.buf.len();
                self.buf.resize(len * 2, 0);
            }
        }
        let n = self
            .stream
            .read(&mut self.buf[self.end..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("server closed the connection".to_string());
        }
        self.end += n;
        Ok(())
    }

    /// Reads the HTTP response to the upgrade request and checks it is a 101.
    async fn read_upgrade_response(&mut self) -> Result<()> {
        loop {
            let data = &self.buf[self.start..self.end];
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(data) {
                Ok(httparse::Status::Complete(n)) => {
                    if resp.code != Some(101) {
                        return Err(format!("upgrade refused: HTTP {:?}", resp.code));
                    }
                    self.deflate = resp.headers.iter().any(|h| {
                        h.name.eq_ignore_ascii_case("sec-websocket-extensions")
                            && h.value.starts_with(b"permessage-deflate")
                    });
                    self.start += n;
                    return Ok(());
                }
                Ok(httparse::Status::Partial) => {
                    if self.end - self.start > 64 * 1024 {
                        return Err("upgrade response too large".to_string());
                    }
                }
                Err(e) => return Err(format!("bad upgrade response: {e}")),
            }
            self.fill().await?;
        }
    }

    /// Parses one complete frame from the buffer, if there is one.
    /// Returns `Ok(None)` when more bytes are needed.
    fn parse_frame(&mut self) -> Result<Option<Option<Event>>> {
        let data = &self.buf[self.start..self.end];
        if data.len() < 2 {
            return Ok(None);
        }
        let fin = data[0] & 0x80 != 0;
        let compressed = data[0] & 0x40 != 0;
        let opcode = data[0] & 0x0f;
        if compressed && (!self.deflate || !fin || !matches!(opcode, 0x1 | 0x2)) {
            return Err("unexpected RSV1 (only whole compressed messages are read)".to_string());
        }
        if data[1] & 0x80 != 0 {
            return Err("server frame is masked".to_string());
        }
        let (len, header) = match data[1] & 0x7f {
            126 => {
                if data.len() < 4 {
                    return Ok(None);
                }
                (u16::from_be_bytes([data[2], data[3]]) as usize, 4)
            }
            127 => {
                if data.len() < 10 {
                    return Ok(None);
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&data[2..10]);
                let len = u64::from_be_bytes(b);
                if len > 64 * 1024 * 1024 {
                    return Err(format!("server frame of {len} bytes"));
                }
                (len as usize, 10)
            }
            n => (n as usize, 2),
        };
        if data.len() < header + len {
            // Make sure the buffer can hold the whole frame.
            if header + len > self.buf.len() - self.start {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if header + len > self.buf.len() {
                    self.buf.resize((header + len).next_power_of_two(), 0);
                }
            }
            return Ok(None);
        }
        let payload = &data[header..header + len];
        let event = match opcode {
            0x0 => {
                if !self.fragmenting {
                    return Err("unexpected continuation frame".to_string());
                }
                self.fragments.extend_from_slice(payload);
                if fin {
                    self.fragmenting = false;
                    let kind = classify(&self.fragments);
                    self.fragments.clear();
                    Some(Event::Message(kind))
                } else {
                    None
                }
            }
            0x1 | 0x2 => {
                if self.fragmenting {
                    return Err("new message inside a fragmented one".to_string());
                }
                if compressed {
                    Some(Event::Message(inflate_and_classify(&self.shared, payload)?))
                } else if fin {
                    Some(Event::Message(classify(payload)))
                } else {
                    self.fragmenting = true;
                    self.fragments.clear();
                    self.fragments.extend_from_slice(payload);
                    None
                }
            }
            0x8 => {
                let code = if len >= 2 {
                    u16::from_be_bytes([payload[0], payload[1]])
                } else {
                    1005
                };
                return Err(format!("server sent close {code}"));
            }
            0x9 => Some(Event::Ping(payload.to_vec())),
            0xA => None,
            op => return Err(format!("server frame with opcode {op}")),
        };
        self.start += header + len;
        if self.shared.measuring.get() {
            let wire = &self.shared.wire_bytes;
            wire.set(wire.get() + (header + len) as u64);
        }
        Ok(Some(event))
    }

    /// The next complete message (answering pings on the way).
    async fn next_message(&mut self) -> Result<Kind> {
        loop {
            match self.next_event().await? {
                Event::Message(kind) => return Ok(kind),
                Event::Ping(payload) => self.send(0xA, &payload).await?,
            }
        }
    }

    /// The next message or ping. Cancel-safe (the open loop selects on it): the only
    /// await is a read, and what it read is in the buffer before it returns.
    async fn next_event(&mut self) -> Result<Event> {
        loop {
            match self.parse_frame()? {
                Some(Some(event)) => return Ok(event),
                Some(None) => {}
                None => self.fill().await?,
            }
        }
    }
}

/// Inflates one compressed server message (RFC 7692 §7.2.2: the sync flush's tail
/// put back) and classifies it.
fn inflate_and_classify(shared: &Shared, payload: &[u8]) -> Result<Kind> {
    let mut inflater = shared.inflater.borrow_mut();
    let mut out = shared.inflated.borrow_mut();
    inflater.reset(false);
    out.clear();
    for input in [payload, &[0, 0, 0xff, 0xff][..]] {
        let mut input = input;
        loop {
            out.reserve(input.len() * 4 + 256);
            let before = inflater.total_in();
            inflater
                .decompress_vec(input, &mut out, flate2::FlushDecompress::Sync)
                .map_err(|e| format!("inflate: {e}"))?;
            input = &input[(inflater.total_in() - before) as usize..];
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
    }
    Ok(classify(&out))
}

/// Opens connection `idx`: TCP connect from its source address, upgrade, and in sub
/// mode subscribe. Returns the connection and its channel name (empty in echo mode).
async fn open(cfg: &Config, shared: Rc<Shared>, idx: usize) -> Result<(Conn, String)> {
    let port = cfg.ports[idx % cfg.ports.len()];
    let server = SocketAddr::V4(SocketAddrV4::new(cfg.host, port));
    let src = Ipv4Addr::new(127, 0, 0, 1 + (idx % cfg.source_ips) as u8);
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    if cfg.source_ips > 1 || src != Ipv4Addr::LOCALHOST {
        // Let connect() pick the source port per destination, so every (source IP,
        // server port) pair gets its own ephemeral range instead of one per source IP.
        let one: libc::c_int = 1;
        // SAFETY: valid fd owned by `socket`; option value is a c_int of the given size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        socket
            .bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))
            .map_err(|e| format!("bind {src}: {e}"))?;
    }
    let stream = socket
        .connect(server)
        .await
        .map_err(|e| format!("connect {server} from {src}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("nodelay: {e}"))?;
    let stream = match &cfg.tls {
        None => Stream::Plain(stream),
        Some(tls) => Stream::Tls(Box::new(
            tls.connector
                .connect(tls.name.clone(), stream)
                .await
                .map_err(|e| format!("TLS handshake with {server}: {e}"))?,
        )),
    };
    let mut conn = Conn::new(stream, shared, 0x9e37_79b9u32.wrapping_mul(idx as u32 + 1));
    let offer = if cfg.compression {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n",
        cfg.path, cfg.host, port
    );
    conn.stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write upgrade: {e}"))?;
    conn.read_upgrade_response().await?;
    if conn.deflate {
        let deflating = &conn.shared.deflating;
        deflating.set(deflating.get() + 1);
    }
    if cfg.mode == Mode::Echo {
        return Ok((conn, String::new()));
    }
    conn.send(0x1, br#"{"type":"sub"}"#).await?;
    loop {
        match conn.next_message().await? {
            Kind::SubAck(ch) => return Ok((conn, ch)),
            // Broadcasts from channels of already-running clients cannot reach us yet;
            // anything else before the sub-ack is ignored.
            _ => continue,
        }
    }
}

/// The request loop of one connection; runs until the runtime is dropped or it fails.
async fn run(
    mut conn: Conn,
    channel: String,
    shared: Rc<Shared>,
    mut go: watch::Receiver<bool>,
) -> Result<()> {
    if go.wait_for(|started| *started).await.is_err() {
        return Ok(());
    }
    let req = format!(r#"{{"type":"req","channel":"{channel}"}}"#);
    loop {
        conn.send(0x1, req.as_bytes()).await?;
        let sent = Instant::now();
        loop {
            let kind = conn.next_message().await?;
            if shared.measuring.get() {
                shared.frames.set(shared.frames.get() + 1);
            }
            if kind == Kind::Ack {
                break;
            }
        }
        if shared.measuring.get() {
            shared.acks.set(shared.acks.get() + 1);
            let us = sent.elapsed().as_micros().min(u64::MAX as u128) as u64;
            shared.latency_us.borrow_mut().saturating_record(us.max(1));
        }
    }
}

/// Open loop: sends a request every `interval` from `offset` after the start on,
/// answered or not, and records each ack's latency from its request's scheduled time.
/// The server answers a connection's requests in order, so an ack is the oldest one's.
async fn run_open(
    mut conn: Conn,
    channel: String,
    shared: Rc<Shared>,
    mut go: watch::Receiver<bool>,
    offset: Duration,
    interval: Duration,
) -> Result<()> {
    if go.wait_for(|started| *started).await.is_err() {
        return Ok(());
    }
    let req = format!(r#"{{"type":"req","channel":"{channel}"}}"#);
    let mut next = tokio::time::Instant::now() + offset;
    let mut scheduled: VecDeque<Instant> = VecDeque::new();
    loop {
        while next <= tokio::time::Instant::now() {
            conn.send(0x1, req.as_bytes()).await?;
            scheduled.push_back(next.into_std());
            next += interval;
            if shared.measuring.get() {
                shared.sent.set(shared.sent.get() + 1);
            }
        }
        let event = tokio::select! {
            event = conn.next_event() => event?,
            () = tokio::time::sleep_until(next) => continue,
        };
        let kind = match event {
            Event::Ping(payload) => {
                conn.send(0xA, &payload).await?;
                continue;
            }
            Event::Message(kind) => kind,
        };
        if shared.measuring.get() {
            shared.frames.set(shared.frames.get() + 1);
        }
        if kind != Kind::Ack {
            continue;
        }
        let due = scheduled.pop_front().ok_or("an ack nothing was sent for")?;
        if shared.measuring.get() {
            shared.acks.set(shared.acks.get() + 1);
            let us = due.elapsed().as_micros().min(u64::MAX as u128) as u64;
            shared.latency_us.borrow_mut().saturating_record(us.max(1));
        }
    }
}

/// Echo mode: `in_flight` messages outstanding; each reply answers the oldest.
async fn run_echo(
    mut conn: Conn,
    cfg: Rc<Config>,
    shared: Rc<Shared>,
    mut go: watch::Receiver<bool>,
) -> Result<()> {
    if go.wait_for(|started| *started).await.is_err() {
        return Ok(());
    }
    let message = cfg.message.as_bytes();
    let mut sent: VecDeque<Instant> = VecDeque::with_capacity(cfg.in_flight);
    for _ in 0..cfg.in_flight {
        conn.send(0x1, message).await?;
        sent.push_back(Instant::now());
    }
    loop {
        conn.next_message().await?;
        let oldest = sent.pop_front().ok_or("a reply nothing was sent for")?;
        if shared.measuring.get() {
            shared.frames.set(shared.frames.get() + 1);
            shared.acks.set(shared.acks.get() + 1);
            let us = oldest.elapsed().as_micros().min(u64::MAX as u128) as u64;
            shared.latency_us.borrow_mut().saturating_record(us.max(1));
        }
        conn.send(0x1, message).await?;
        sent.push_back(Instant::now());
    }
}

async fn bench(cfg: Config) -> ExitCode {
    let histogram = match Histogram::new_with_bounds(1, 120_000_000, 3) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("histogram: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shared = Rc::new(Shared {
        measuring: Cell::new(false),
        acks: Cell::new(0),
        frames: Cell::new(0),
        sent: Cell::new(0),
        errors: Cell::new(0),
        error_samples: RefCell::new(Vec::new()),
        latency_us: RefCell::new(histogram),
        wire_bytes: Cell::new(0),
        deflating: Cell::new(0),
        inflater: RefCell::new(flate2::Decompress::new(false)),
        inflated: RefCell::new(Vec::new()),
    });
    let (go_tx, go_rx) = watch::channel(false);
    let cfg = Rc::new(cfg);

    // Connect in batches so the server's accept queue and handshakes are not swamped.
    let connect_started = Instant::now();
    let mut connected = 0usize;
    let mut idx = 0usize;
    while idx < cfg.connections {
        let n = cfg.batch.min(cfg.connections - idx);
        let handles: Vec<JoinHandle<Result<(Conn, String)>>> = (idx..idx + n)
            .map(|i| {
                let cfg = cfg.clone();
                let shared = shared.clone();
                tokio::task::spawn_local(async move {
                    tokio::time::timeout(cfg.connect_timeout, open(&cfg, shared, i))
                        .await
                        .unwrap_or_else(|_| Err("timed out connecting/subscribing".to_string()))
                })
            })
            .collect();
        for handle in handles {
            match handle.await {
                Ok(Ok((conn, channel))) => {
                    connected += 1;
                    let shared2 = shared.clone();
                    let go = go_rx.clone();
                    let cfg = cfg.clone();
                    let nth = connected - 1;
                    tokio::task::spawn_local(async move {
                        let ran = match (cfg.mode, cfg.rate) {
                            (Mode::Sub, None) => run(conn, channel, shared2.clone(), go).await,
                            (Mode::Sub, Some(rate)) => {
                                // Each connection at rate / connections, the n-th one's
                                // schedule shifted by n / connections of its interval.
                                let n = cfg.connections as f64;
                                let interval = Duration::from_secs_f64(n / rate);
                                let offset = interval.mul_f64(nth as f64 / n);
                                run_open(conn, channel, shared2.clone(), go, offset, interval).await
                            }
                            (Mode::Echo, _) => run_echo(conn, cfg, shared2.clone(), go).await,
                        };
                        if let Err(e) = ran {
                            shared2.error(e);
                        }
                    });
                }
                Ok(Err(e)) => shared.error(e),
                Err(e) => shared.error(format!("connect task: {e}")),
            }
        }
        idx += n;
    }
    let connect_s = connect_started.elapsed().as_secs_f64();
    eprintln!(
        "connected {connected}/{} in {connect_s:.2}s ({} errors)",
        cfg.connections,
        shared.errors.get()
    );

    let _ = go_tx.send(true);
    tokio::time::sleep(cfg.warmup).await;
    let errors_before = shared.errors.get();
    shared.measuring.set(true);
    let window_start = Instant::now();
    eprintln!("WINDOW_START");
    tokio::time::sleep(cfg.duration).await;
    shared.measuring.set(false);
    let window = window_start.elapsed().as_secs_f64();
    eprintln!("WINDOW_END");

    for msg in shared.error_samples.borrow().iter() {
        eprintln!("error: {msg}");
    }
    let acks = shared.acks.get();
    let frames = shared.frames.get();
    let hist = shared.latency_us.borrow();
    let quantile_ms = |q: f64| {
        if hist.is_empty() {
            0.0
        } else {
            hist.value_at_quantile(q) as f64 / 1000.0
        }
    };
    let (p50, p99, p999) = (quantile_ms(0.5), quantile_ms(0.99), quantile_ms(0.999));
    let sent = shared.sent.get();
    println!(
        "{{\"connections\": {connected}, \"duration_s\": {window:.3}, \"acks\": {acks}, \
         \"acks_per_s\": {:.1}, \"frames_received\": {frames}, \"frames_per_s\": {:.1}, \
         \"p50_ms\": {p50:.3}, \"p99_ms\": {p99:.3}, \"p999_ms\": {p999:.3}, \
         \"errors\": {}, \"errors_in_run\": {}, \"connect_s\": {connect_s:.3}, \
         \"wire_bytes_per_frame\": {:.1}, \"deflating\": {}, \"rate\": {}, \
         \"sent\": {sent}, \"sent_per_s\": {:.1}}}",
        acks as f64 / window,
        frames as f64 / window,
        shared.errors.get(),
        shared.errors.get() - errors_before,
        shared.wire_bytes.get() as f64 / frames.max(1) as f64,
        shared.deflating.get(),
        cfg.rate.map_or("null".to_string(), |r| r.to_string()),
        sent as f64 / window,
    );
    if connected == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn main() -> ExitCode {
    let cfg = match parse_args() {
        Ok(cfg) => cfg,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("warpsocket-bench: {msg}");
            }
            eprintln!("{USAGE}");
            return if msg.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warpsocket-bench: cannot start tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    let code = local.block_on(&runtime, bench(cfg));
    // Do not wait for the connection tasks to wind down: the OS closes the sockets.
    std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 1 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_messages_with_any_spacing() {
        assert_eq!(classify(br#"{"type":"ack"}"#), Kind::Ack);
        assert_eq!(classify(br#"{"type": "ack"}"#), Kind::Ack);
        assert_eq!(
            classify(br#"{"type": "evt", "t": "This is a message to my dear clients"}"#),
            Kind::Evt
        );
        assert_eq!(
            classify(br#"{"type": "sub-ack", "ch": "3-7"}"#),
            Kind::SubAck("3-7".to_string())
        );
        assert_eq!(
            classify(br#"{"ch":"x","type" : "sub-ack"}"#),
            Kind::SubAck("x".into())
        );
        assert_eq!(classify(b"garbage"), Kind::Other);
        assert_eq!(classify(br#"{"type":5}"#), Kind::Other);
    }

    /// A one-connection echo server on std threads: answers the upgrade with 101, then
    /// sends every client text frame back unmasked.
    fn echo_server() -> u16 {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") {
                stream.read_exact(&mut byte).unwrap();
                request.push(byte[0]);
            }
            stream
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                .unwrap();
            let mut header = [0u8; 6];
            while stream.read_exact(&mut header).is_ok() {
                let len = (header[1] & 0x7f) as usize;
                let mut payload = vec![0u8; len];
                stream.read_exact(&mut payload).unwrap();
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= header[2 + (i & 3)];
                }
                let mut reply = vec![0x81, len as u8];
                reply.extend_from_slice(&payload);
                stream.write_all(&reply).unwrap();
            }
        });
        port
    }

    #[test]
    fn echo_mode_keeps_messages_in_flight_and_counts_replies() {
        let port = echo_server();
        let cfg = Rc::new(Config {
            host: Ipv4Addr::LOCALHOST,
            ports: vec![port],
            connections: 1,
            source_ips: 1,
            batch: 1,
            warmup: Duration::ZERO,
            duration: Duration::ZERO,
            connect_timeout: Duration::from_secs(5),
            path: "/".into(),
            mode: Mode::Echo,
            message: "hello".into(),
            in_flight: 3,
            tls: None,
            compression: false,
            rate: None,
        });
        let shared = shared_for_test();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        let counted = shared.clone();
        local.block_on(&runtime, async move {
            let (conn, channel) = open(&cfg, counted.clone(), 0).await.unwrap();
            assert_eq!(channel, "");
            let (_go_tx, go) = watch::channel(true);
            let ran =
                tokio::time::timeout(Duration::from_millis(300), run_echo(conn, cfg, counted, go))
                    .await;
            assert!(ran.is_err(), "runs until stopped: {ran:?}");
        });
        assert!(shared.acks.get() > 10, "{} replies", shared.acks.get());
        assert_eq!(shared.acks.get(), shared.frames.get());
        assert_eq!(shared.latency_us.borrow().len(), shared.acks.get());
        assert_eq!(shared.errors.get(), 0);
    }

    /// A one-connection server of the sub workload on std threads: a sub-ack for the
    /// first message, then an event and an ack for every request, each after `delay`.
    fn sub_server(delay: Duration) -> u16 {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") {
                stream.read_exact(&mut byte).unwrap();
                request.push(byte[0]);
            }
            stream
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                .unwrap();
            let mut header = [0u8; 6];
            let mut subscribed = false;
            while stream.read_exact(&mut header).is_ok() {
                let mut payload = vec![0u8; (header[1] & 0x7f) as usize];
                stream.read_exact(&mut payload).unwrap();
                let replies: &[&[u8]] = if subscribed {
                    std::thread::sleep(delay);
                    &[br#"{"type":"evt"}"#, br#"{"type":"ack"}"#]
                } else {
                    subscribed = true;
                    &[br#"{"type":"sub-ack","ch":"c"}"#]
                };
                for reply in replies {
                    let mut frame = vec![0x81, reply.len() as u8];
                    frame.extend_from_slice(reply);
                    stream.write_all(&frame).unwrap();
                }
            }
        });
        port
    }

    fn shared_for_test() -> Rc<Shared> {
        Rc::new(Shared {
            measuring: Cell::new(true),
            acks: Cell::new(0),
            frames: Cell::new(0),
            sent: Cell::new(0),
            errors: Cell::new(0),
            error_samples: RefCell::new(Vec::new()),
            latency_us: RefCell::new(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()),
            wire_bytes: Cell::new(0),
            deflating: Cell::new(0),
            inflater: RefCell::new(flate2::Decompress::new(false)),
            inflated: RefCell::new(Vec::new()),
        })
    }

    /// Open loop against a server that takes 20 ms per request, offered 100 requests/s:
    /// requests go out on schedule regardless, the server falls behind, and the latency
    /// from the scheduled time shows the queue (a closed loop would report ~20 ms).
    #[test]
    fn open_loop_sends_on_schedule_and_measures_from_it() {
        let port = sub_server(Duration::from_millis(20));
        let cfg = Config {
            ports: vec![port],
            source_ips: 1,
            ..parse_args_from(["--port", "1"]).unwrap()
        };
        let shared = shared_for_test();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        let counted = shared.clone();
        local.block_on(&runtime, async move {
            let (conn, channel) = open(&cfg, counted.clone(), 0).await.unwrap();
            assert_eq!(channel, "c");
            let (_go_tx, go) = watch::channel(true);
            let interval = Duration::from_millis(10);
            let ran = tokio::time::timeout(
                Duration::from_millis(500),
                run_open(conn, channel, counted, go, Duration::ZERO, interval),
            )
            .await;
            assert!(ran.is_err(), "runs until stopped: {ran:?}");
        });
        let (sent, acks) = (shared.sent.get(), shared.acks.get());
        assert!(
            (45..=52).contains(&sent),
            "{sent} requests sent in 500 ms at 100/s"
        );
        assert!((15..=26).contains(&acks), "{acks} acks at 50/s in 500 ms");
        assert_eq!(shared.frames.get(), 2 * acks);
        let p99_ms = shared.latency_us.borrow().value_at_quantile(0.99) / 1000;
        assert!(
            p99_ms > 150,
            "queueing shows in the latency: p99 {p99_ms} ms"
        );
        assert_eq!(shared.errors.get(), 0);
    }

    #[test]
    fn rate_needs_sub_mode_and_a_positive_value() {
        assert!(parse_args_from(["--port", "1", "--rate", "0"]).is_err());
        assert!(parse_args_from(["--port", "1", "--rate", "5", "--mode", "echo"]).is_err());
        let cfg = parse_args_from(["--port", "1", "--rate", "2500.5"]).unwrap();
        assert_eq!(cfg.rate, Some(2500.5));
    }

    #[test]
    fn encodes_masked_frames() {
        let mut out = Vec::new();
        encode_frame(&mut out, 1, b"abc", [1, 2, 3, 4]);
        assert_eq!(
            out,
            vec![0x81, 0x83, 1, 2, 3, 4, b'a' ^ 1, b'b' ^ 2, b'c' ^ 3]
        );
        encode_frame(&mut out, 2, &[0u8; 300], [0; 4]);
        assert_eq!(&out[..4], &[0x82, 0x80 | 126, 1, 44]);
        assert_eq!(out.len(), 4 + 4 + 300);
    }
}
