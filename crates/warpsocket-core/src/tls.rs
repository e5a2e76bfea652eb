//! TLS on every bound address (docs/api.md#tls): the certificate chain and key are
//! loaded and checked once, at start, so a bad file is a `ValueError` from
//! `start()` rather than a failure at the first handshake; each accepted TCP
//! connection then goes through [`Tls::accept`] before the HTTP upgrade.

use std::fmt;
use std::io::{self, IoSlice};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ParsedCertificate;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{InconsistentKeys, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::handshake::{self, Refusal};
use crate::request_head;
pub use crate::tls_stream::TlsStream;

/// `start()`'s argument names, as the errors report them.
const CERT: &str = "tls_cert";
const KEY: &str = "tls_key";

/// The answer to plain HTTP (e.g. a `ws://` client) on a TLS port: a 400 the
/// client can show, never a 101 or a 426.
pub(crate) const PLAIN_HTTP: Refusal = Refusal::new(
    handshake::status::BAD_REQUEST,
    "this port only speaks TLS: use wss:// or https://",
);

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The loaded certificate and key, shared by every I/O thread.
#[derive(Clone)]
pub struct Tls {
    config: Arc<ServerConfig>,
}

impl Tls {
    /// Loads `start()`'s `tls_cert` and `tls_key`: a PEM chain (the server's
    /// certificate first, then any intermediates) and its PEM private key
    /// (PKCS#8, PKCS#1 RSA or SEC1 EC, unencrypted). `Ok(None)` when neither
    /// is given; an error naming the argument to fix otherwise.
    pub fn load(cert: Option<&Path>, key: Option<&Path>) -> Result<Option<Tls>, TlsError> {
        let (cert, key) = match (cert, key) {
            (None, None) => return Ok(None),
            (Some(_), None) => return Err(TlsError::Missing { missing: KEY }),
            (None, Some(_)) => return Err(TlsError::Missing { missing: CERT }),
            (Some(cert), Some(key)) => (cert, key),
        };
        // ring rather than aws-lc-rs: measured here, a TLS 1.3 handshake and bulk
        // AES-GCM cost the same within noise with either, but ring's C builds
        // about 4x faster than aws-lc-sys (18 s vs 81 s of CPU, release) and
        // needs nothing beyond a C compiler on any target (aws-lc-sys can want
        // cmake, or nasm on Windows), which matters for wheels built from sdist.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = read_chain(cert)?;
        let signing_key = read_key(key, &provider)?;
        let certified = CertifiedKey::new(chain, signing_key);
        match certified.keys_match() {
            // Unknown: the key cannot tell its public half; the handshake will.
            Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
            Err(_) => {
                return Err(TlsError::KeyMismatch {
                    cert: cert.to_path_buf(),
                    key: key.to_path_buf(),
                })
            }
        }
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("ring's provider has cipher suites for TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
        // WebSocket upgrades are HTTP/1.1 (RFC 6455); a browser offering h2
        // too must not pick it, and one offering neither still gets through.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(Tls {
            config: Arc::new(config),
        }))
    }

    /// Runs the server side of the handshake on an accepted connection.
    ///
    /// Holds no timer: the caller races it against the upgrade's deadline
    /// (`tokio::time::timeout_at`), which thus covers the TLS handshake too;
    /// dropping the future closes the connection.
    ///
    /// A connection whose first byte cannot start TLS is not handed to rustls
    /// (whose answer would be a TLS alert, meaningless to an HTTP client): one
    /// that looks like plain HTTP gets a 400 saying to use `wss://`/`https://`,
    /// anything else is closed with nothing written.
    pub async fn accept(&self, tcp: TcpStream) -> Result<TlsStream, AcceptError> {
        let mut first = [0u8; 1];
        match tcp.peek(&mut first).await {
            Ok(0) => return Err(AcceptError::Closed),
            Ok(_) => {}
            Err(e) => return Err(AcceptError::Handshake(e)),
        }
        match first[0] {
            TLS_HANDSHAKE_RECORD => TlsStream::accept(tcp, self.config.clone())
                .await
                .map_err(AcceptError::Handshake),
            // Every HTTP method is an upper-case token.
            b'A'..=b'Z' => {
                answer_plain_http(tcp).await;
                Err(AcceptError::PlainHttp)
            }
            _ => Err(AcceptError::NotTls),
        }
    }
}

/// A connection's byte stream from the upgrade on: plain TCP, or TLS over it.
pub(crate) enum Stream {
    Plain(TcpStream),
    /// Boxed: rustls's state is about 1.1 KB, and every connection's task
    /// holds this inline (see connection.rs's size test).
    Tls(Box<TlsStream>),
}

impl Stream {
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Bytes are waiting to go to TCP that no frame of ours accounts for:
    /// TLS records of what was written (or rustls's own messages) that TCP
    /// did not take yet. Never for plain TCP, whose writes go straight out.
    pub(crate) fn wants_write(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(tls) => tls.wants_write(),
        }
    }
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

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    /// With TLS, queues a close_notify alert first and writes what TCP takes.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Reads the request head, so the close after the 400 leaves nothing unread
/// (unread bytes would turn the close into a reset that may destroy the 400
/// before the client reads it), then answers. Whatever the head says, and
/// if it is too large or not HTTP after all, the answer is the same 400.
/// Best effort: errors just end the connection.
async fn answer_plain_http(mut tcp: TcpStream) {
    if let Ok(Ok(None)) | Err(_) = request_head::read(&mut tcp).await {
        return;
    }
    if tcp
        .write_all(&handshake::refusal_response(PLAIN_HTTP))
        .await
        .is_ok()
    {
        let _ = tcp.shutdown().await;
    }
}

/// Why a connection did not become a TLS stream. The connection is closed.
#[derive(Debug)]
pub enum AcceptError {
    /// The peer closed before sending anything.
    Closed,
    /// Plain HTTP on the TLS port; answered with 400.
    PlainHttp,
    /// Neither TLS nor HTTP; closed without a word.
    NotTls,
    /// The TLS handshake failed (rustls's error, e.g. no common cipher suite
    /// or a certificate the client refused), or the connection broke.
    Handshake(io::Error),
}

impl fmt::Display for AcceptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcceptError::Closed => f.write_str("the client closed before the TLS handshake"),
            AcceptError::PlainHttp => f.write_str("plain HTTP on a TLS port (answered 400)"),
            AcceptError::NotTls => f.write_str("the client does not speak TLS"),
            AcceptError::Handshake(e) => write!(f, "TLS handshake failed: {e}"),
        }
    }
}

impl std::error::Error for AcceptError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AcceptError::Handshake(e) => Some(e),
            _ => None,
        }
    }
}

/// Why `tls_cert`/`tls_key` cannot be used; [`TlsError::argument`] names the
/// one to fix, and the message says how (the binding raises it as `ValueError`).
#[derive(Debug)]
pub enum TlsError {
    /// One of the pair was given without the other.
    Missing { missing: &'static str },
    /// A file could not be read.
    Unreadable {
        argument: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A file is not well-formed PEM.
    NotPem {
        argument: &'static str,
        path: PathBuf,
        detail: &'static str,
    },
    /// The `tls_cert` file has no certificate.
    NoCertificate { path: PathBuf },
    /// The `tls_cert` file's first certificate is not a valid X.509 certificate.
    BadCertificate { path: PathBuf },
    /// The `tls_key` file has no unencrypted private key.
    NoKey { path: PathBuf },
    /// The `tls_key` file's key is of a kind rustls cannot sign with.
    BadKey { path: PathBuf },
    /// The key is not the certificate's.
    KeyMismatch { cert: PathBuf, key: PathBuf },
}

impl TlsError {
    /// The `start()` argument to fix: `"tls_cert"` or `"tls_key"`.
    pub fn argument(&self) -> &'static str {
        match self {
            TlsError::Missing { missing } => missing,
            TlsError::Unreadable { argument, .. } | TlsError::NotPem { argument, .. } => argument,
            TlsError::NoCertificate { .. } | TlsError::BadCertificate { .. } => CERT,
            TlsError::NoKey { .. } | TlsError::BadKey { .. } | TlsError::KeyMismatch { .. } => KEY,
        }
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Missing { missing } => {
                let given = if *missing == KEY { CERT } else { KEY };
                write!(
                    f,
                    "{missing} is missing: {given} was given without it; give both the \
                     certificate chain and its private key, or neither"
                )
            }
            TlsError::Unreadable {
                argument,
                path,
                source,
            } => write!(f, "{argument}: cannot read {}: {source}", path.display()),
            TlsError::NotPem {
                argument,
                path,
                detail,
            } => write!(
                f,
                "{argument}: {} is not valid PEM: {detail}",
                path.display()
            ),
            TlsError::NoCertificate { path } => write!(
                f,
                "{CERT}: {} contains no PEM certificate (\"-----BEGIN CERTIFICATE-----\"); \
                 it must hold the server's certificate, then any intermediates",
                path.display()
            ),
            TlsError::BadCertificate { path } => write!(
                f,
                "{CERT}: the first certificate in {} is not a valid X.509 certificate",
                path.display()
            ),
            TlsError::NoKey { path } => write!(
                f,
                "{KEY}: {} contains no unencrypted PEM private key (\"PRIVATE KEY\", \
                 \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\"); encrypted keys are not supported",
                path.display()
            ),
            TlsError::BadKey { path } => write!(
                f,
                "{KEY}: the private key in {} is of a kind that cannot be used; use an RSA \
                 (2048 bits or more), ECDSA P-256/P-384 or Ed25519 key",
                path.display()
            ),
            TlsError::KeyMismatch { cert, key } => write!(
                f,
                "{KEY}: the private key in {} does not match the certificate in {} (the first \
                 certificate in that file must be the one this key belongs to)",
                key.display(),
                cert.display()
            ),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsError::Unreadable { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn read_file(argument: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Unreadable {
        argument,
        path: path.to_path_buf(),
        source,
    })
}

/// pki-types' own messages print markers as byte arrays; these read better.
fn pem_problem(error: &pem::Error) -> &'static str {
    match error {
        pem::Error::MissingSectionEnd { .. } => "a section has no \"-----END ...-----\" line",
        pem::Error::IllegalSectionStart { .. } => "a \"-----BEGIN ...-----\" line is malformed",
        pem::Error::Base64Decode(_) => "a section's body is not valid base64",
        pem::Error::SectionTooLarge => "a section is larger than 256 MB",
        _ => "it cannot be parsed",
    }
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(CERT, path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::NotPem {
            argument: CERT,
            path: path.to_path_buf(),
            detail: pem_problem(&e),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    };
    // Checked here so that a broken certificate is not reported by the key
    // check below as a tls_key problem.
    ParsedCertificate::try_from(leaf).map_err(|_| TlsError::BadCertificate {
        path: path.to_path_buf(),
    })?;
    Ok(chain)
}

fn read_key(
    path: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<dyn rustls::sign::SigningKey>, TlsError> {
    let pem = read_file(KEY, path)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_path_buf(),
        },
        e => TlsError::NotPem {
            argument: KEY,
            path: path.to_path_buf(),
            detail: pem_problem(&e),
        },
    })?;
    provider
        .key_provider
        .load_private_key(key)
        .map_err(|_| TlsError::BadKey {
            path: path.to_path_buf(),
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::ServerName;
    use rustls::{CertificateError, ClientConfig, RootCertStore};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::time::Instant;
    use tokio_rustls::TlsConnector;

    /// Test-only keys in the two legacy PEM encodings, which rcgen cannot
    /// produce with ring (`openssl genrsa -traditional 2048`, and
    /// `openssl ec` on a P-256 key).
    const RSA_PKCS1_KEY: &str = "\
-----BEGIN RSA PRIVATE KEY-----
MIIEpAIBAAKCAQEAvk58h/FfihplmP949XMRjkVeVIFGFqUoGD0We7Pjix221c4j
QRQV2HwJUaxcXooNdozHX8mqhrLuHcx9bZuoj389/TJhucvaj75VoboyTcjWJp6T
kn072Ny7NXYtjE2QCAZDZCuOQDolEfodBqRipdVak4cxEN9UYX65oMtyAINbhlN2
nWe1pwx4PzzlRHtmbpug3FItaslD4mXaTsaSBEO2ba1fKXYsW80hBm8S9aIBGCIA
dbSUM2hpOhRs51k6pKinRC03R4+lf1/DKwLshYd5c+k/sQBLfixLx4k0qFwSP8/e
vpqG40aR8M0SqNqNBByRfDQe53sfNSDCEzg8+QIDAQABAoIBAF6WqDLxd+kuoZzg
LgDhhrJOLEqYTnvm7vzNMCWgDdMRm9S9NqycDRei3wbnQqoCuBpacqZbmBSHTu8k
upsGKUvZlLgKmKQ+fI3BrtJJt8MNtdNQMk03Tc3GOI6kBJOd4Z77bfeV5ohp3g8H
X/HzNszyNKjrIyodttUWpbEULb+urwyz32P5WUFvDdfuqzEec+hgpPfc3MPfUGm2
4LeMKCDXmFlhM/KAlttwXEw2YZ8u8xBR5tVmVKwXgOC9itqtrwD8Sm86qgKwNfOf
ueOZHiimxaJeSImbTb4KcpFgK0iM1zV2OXKcorHCsSD/jlbpT8CMiR+ql0g0i222
wxS11BkCgYEA4l/OrCdckn8BVsbdw1qAAoP5keuLTyDo2XOJJgEJfPP37YgN353r
GVxzhoO+2OYIS1v3gFIQi5UyL6gCs6+h2YAC7J0DeN82OEPk9TvwUGLb9Pq/g35o
nVIBFmUiMzmhjRssy6sbKFVlJznORIj0UFGb99fVCt65sjCTt1OQaXcCgYEA1zZO
4I/YxFrLbl7zlKhQkvhJpkEY8W1qHpHTHOdsQzhA5gPOI5S/9Gz1SwEKXwR7t8i7
ncXztTr7epgiEs8Pr54/cMgpj6bHmvEWsy/i1DQcFoQ6rA5ZEJKeGk22LBn1y3ac
czeJ08rG8M7Zlwt7/lhHR2tZOUOW8VyeIxGSKQ8CgYBLyK8zyume0Y3tMx5CrCV2
sh/2zdgRYX8SbS9Y3bgDcNlrV8TtO7zc/KpgOfLGQhw8vkkZWF/ZmtT2R1TAOugA
HG7eL6Jd8LwCEhiwUKSfBLmGRfufVc5H/JAIo0rTw1NmHdbdSCcLVatLenqnTwIb
cXa5fjQAM5gPI1wQX5VU+QKBgQDKq9RAWncTA0ZNHJJbTt8CaVxCe0+YHSgwvbeI
otArxZAojTDWBUF4WBvwlHxF2xz/iMRW4pKN+4vUeeystd7ZzjeEaJvrMm8LlTuB
Z/k/SguhkMkIO0LY/ppxvvluMsxs3bicMJNVpsMPCF2VhzUv48bMlWWjLem6RzSN
ZgC1NQKBgQCTkrCoC7BnnoBuS1T1tbousqSHHw15th24X9NtKAK8fIJ0eXDomhoG
mPnaF65ky6NC5gDW5YG3l+/IrF7WgiqloWVa7JuNSVWbn5wdCP2BoVqpYl0xBRNu
6dPnvPbYs+1Tfr+dzkJ65xtA4DtgWGwYbpv71oQKwawXfpZQHAo4bQ==
-----END RSA PRIVATE KEY-----
";
    const EC_SEC1_KEY: &str = "\
-----BEGIN EC PRIVATE KEY-----
MHcCAQEEICJoRr599roxYpe5XIEd2XATd5rl0dlv3jbvgyZ0QTAYoAoGCCqGSM49
AwEHoUQDQgAEIzbq7CVpApMxzcKqaThXtTn3NZndKjdmESp5JB4jq1ZFMHwbSfUa
uf05Uks7CCIf6DtD1mfMNuYriFapw6SBug==
-----END EC PRIVATE KEY-----
";

    /// A folder of PEM files, removed when dropped.
    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Dir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "warpsocket-tls-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }

        fn file(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A test CA, made fresh for each test.
    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        der: CertificateDer<'static>,
        pem: String,
    }

    impl Ca {
        fn new() -> Ca {
            let mut params = CertificateParams::new(Vec::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            Ca {
                der: cert.der().clone(),
                pem: cert.pem(),
                issuer: Issuer::new(params, key),
            }
        }

        /// A leaf for `localhost`: its PEM chain (leaf, then the CA) and its
        /// PKCS#8 key.
        fn leaf(&self) -> (String, String) {
            let key = KeyPair::generate().unwrap();
            let cert = leaf_params().signed_by(&key, &self.issuer).unwrap();
            (self.chain(&cert), key.serialize_pem())
        }

        fn chain(&self, leaf: &rcgen::Certificate) -> String {
            format!("{}{}", leaf.pem(), self.pem)
        }

        fn client(&self, version: &'static rustls::SupportedProtocolVersion) -> TlsConnector {
            let mut roots = RootCertStore::empty();
            roots.add(self.der.clone()).unwrap();
            let mut config = ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            TlsConnector::from(Arc::new(config))
        }
    }

    fn leaf_params() -> CertificateParams {
        CertificateParams::new(vec!["localhost".to_string()]).unwrap()
    }

    /// A key given in PEM as rcgen's subject: its public half, as rustls
    /// reads it from the private key.
    struct PublicKey {
        bits: Vec<u8>,
        algorithm: &'static rcgen::SignatureAlgorithm,
    }

    impl rcgen::PublicKeyData for PublicKey {
        fn der_bytes(&self) -> &[u8] {
            &self.bits
        }

        fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
            self.algorithm
        }
    }

    /// One DER element: (tag, contents, what follows).
    fn der(input: &[u8]) -> (u8, &[u8], &[u8]) {
        let (tag, first) = (input[0], input[1]);
        let (len, start) = if first < 0x80 {
            (usize::from(first), 2)
        } else {
            let n = usize::from(first & 0x7f);
            let len = input[2..2 + n]
                .iter()
                .fold(0, |len, &b| len << 8 | usize::from(b));
            (len, 2 + n)
        };
        (tag, &input[start..start + len], &input[start + len..])
    }

    fn public_key(key_pem: &str, algorithm: &'static rcgen::SignatureAlgorithm) -> PublicKey {
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let signing = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(key)
            .unwrap();
        let spki = signing.public_key().unwrap();
        // SubjectPublicKeyInfo: SEQUENCE { AlgorithmIdentifier, BIT STRING }.
        let (_, fields, _) = der(spki.as_ref());
        let (_, _, rest) = der(fields);
        let (tag, bit_string, _) = der(rest);
        assert_eq!(tag, 0x03);
        PublicKey {
            // The first byte counts unused bits: always 0 here.
            bits: bit_string[1..].to_vec(),
            algorithm,
        }
    }

    fn load(dir: &Dir, chain: &str, key: &str) -> Result<Option<Tls>, TlsError> {
        let cert = dir.file("cert.pem", chain);
        let key = dir.file("key.pem", key);
        Tls::load(Some(&cert), Some(&key))
    }

    /// Accepts one connection with `tls` under a deadline of `limit`.
    async fn serve_one(
        tls: Tls,
        limit: Duration,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<
            Result<Result<TlsStream, AcceptError>, tokio::time::error::Elapsed>,
        >,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::time::timeout_at(Instant::now() + limit, tls.accept(tcp)).await
        });
        (addr, task)
    }

    /// Connects over TLS as `localhost`, sends `ping`, expects `pong`.
    async fn round_trip(tls: Tls, ca: &Ca, version: &'static rustls::SupportedProtocolVersion) {
        let (addr, server) = serve_one(tls, Duration::from_secs(10)).await;
        let server = tokio::spawn(async move {
            let mut stream = server.await.unwrap().unwrap().unwrap();
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
            stream.write_all(b"pong").await.unwrap();
            stream.shutdown().await.unwrap();
            (
                stream.alpn_protocol().map(<[u8]>::to_vec),
                stream.protocol_version(),
            )
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = ca.client(version).connect(name, tcp).await.unwrap();
        client.write_all(b"ping").await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"pong");
        let (alpn, negotiated) = server.await.unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert_eq!(negotiated, Some(version.version));
    }

    /// An established TLS 1.2 connection: the server's stream, and the
    /// client's TCP stream and rustls connection apart, for tests that look
    /// at the records on the wire. TLS 1.2 so that every application-data
    /// record after the handshake carries data (TLS 1.3 sends its session
    /// tickets in such records too).
    pub(crate) async fn tls12_pair() -> (TlsStream, TcpStream, rustls::ClientConnection) {
        let (dir, ca) = (Dir::new(), Ca::new());
        let (chain, key) = ca.leaf();
        let tls = load(&dir, &chain, &key).unwrap().unwrap();
        let (addr, server) = serve_one(tls, Duration::from_secs(10)).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let client = ca
            .client(&rustls::version::TLS12)
            .connect(name, tcp)
            .await
            .unwrap();
        let server = server.await.unwrap().unwrap().unwrap();
        let (tcp, conn) = client.into_inner();
        (server, tcp, conn)
    }

    /// An established connection of `version`: the server's stream and
    /// the client's.
    async fn pair(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (TlsStream, tokio_rustls::client::TlsStream<TcpStream>) {
        let (dir, ca) = (Dir::new(), Ca::new());
        let (chain, key) = ca.leaf();
        let tls = load(&dir, &chain, &key).unwrap().unwrap();
        let (addr, server) = serve_one(tls, Duration::from_secs(10)).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let client = ca.client(version).connect(name, tcp).await.unwrap();
        (server.await.unwrap().unwrap().unwrap(), client)
    }

    /// A message of `len` bytes that no shorter pattern repeats in.
    fn message(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ (i / 251 % 256) as u8 ^ seed)
            .collect()
    }

    /// A megabyte each way, over both versions: the server reads it all,
    /// then echoes it; records of 16 KB cut across every read and write.
    /// With TLS 1.3 the client updates its keys halfway, asking the server
    /// to update its own too, which the server's records must follow.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_megabyte_each_way_and_a_key_update() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (mut server, mut client) = pair(version).await;
            let sent = message(1 << 20, 7);
            let echo = tokio::spawn(async move {
                let mut got = vec![0; 1 << 20];
                server.read_exact(&mut got).await.unwrap();
                server.write_all(&got).await.unwrap();
                server.flush().await.unwrap();
                assert!(!server.wants_write());
                server.shutdown().await.unwrap();
                got
            });
            let (first, second) = sent.split_at(sent.len() / 2);
            client.write_all(first).await.unwrap();
            if version == &rustls::version::TLS13 {
                client.get_mut().1.refresh_traffic_keys().unwrap();
            }
            client.write_all(second).await.unwrap();
            client.flush().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            assert!(echo.await.unwrap() == sent, "the server read it whole");
            assert!(back == sent, "the client read it back whole");
        }
    }

    /// Records that arrive a byte at a time are put together across reads,
    /// in both versions, and a close_notify after them ends the stream.
    #[tokio::test]
    async fn records_sent_a_byte_at_a_time() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (mut server, client) = pair(version).await;
            let (mut tcp, mut conn) = client.into_inner();
            let sent = [message(100, 1), message(20_000, 2)].concat();
            let reading = tokio::spawn(async move {
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.unwrap();
                got
            });
            std::io::Write::write_all(&mut conn.writer(), &sent).unwrap();
            conn.send_close_notify();
            let mut wire = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut wire).unwrap();
            }
            for byte in wire.chunks(1) {
                tcp.write_all(byte).await.unwrap();
                // The server reads each byte before the next one comes.
                tokio::task::yield_now().await;
            }
            assert!(reading.await.unwrap() == sent);
        }
    }

    /// The client's verdict on the server's certificate.
    async fn client_error(tls: Tls, ca: &Ca) -> rustls::Error {
        let (addr, server) = serve_one(tls, Duration::from_secs(10)).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let err = ca
            .client(&rustls::version::TLS13)
            .connect(name, tcp)
            .await
            .expect_err("the client must refuse the certificate");
        // The client's alert fails the server's side too.
        assert!(matches!(
            server.await.unwrap(),
            Ok(Err(AcceptError::Handshake(_)))
        ));
        err.into_inner()
            .and_then(|e| e.downcast::<rustls::Error>().ok())
            .map(|e| *e)
            .expect("a rustls error")
    }

    #[tokio::test]
    async fn serves_tls_1_3_and_1_2_with_http_1_1_alpn() {
        let (dir, ca) = (Dir::new(), Ca::new());
        let (chain, key) = ca.leaf();
        let tls = load(&dir, &chain, &key).unwrap().unwrap();
        round_trip(tls.clone(), &ca, &rustls::version::TLS13).await;
        round_trip(tls, &ca, &rustls::version::TLS12).await;
    }

    #[tokio::test]
    async fn loads_pkcs1_rsa_and_sec1_ec_keys() {
        let (dir, ca) = (Dir::new(), Ca::new());
        for (key, algorithm) in [
            (RSA_PKCS1_KEY, &rcgen::PKCS_RSA_SHA256),
            (EC_SEC1_KEY, &rcgen::PKCS_ECDSA_P256_SHA256),
        ] {
            let cert = leaf_params()
                .signed_by(&public_key(key, algorithm), &ca.issuer)
                .unwrap();
            let tls = load(&dir, &ca.chain(&cert), key).unwrap().unwrap();
            round_trip(tls, &ca, &rustls::version::TLS13).await;
        }
    }

    #[tokio::test]
    async fn client_refuses_a_certificate_for_another_host() {
        let (dir, ca) = (Dir::new(), Ca::new());
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["example.com".to_string()])
            .unwrap()
            .signed_by(&key, &ca.issuer)
            .unwrap();
        let tls = load(&dir, &ca.chain(&cert), &key.serialize_pem())
            .unwrap()
            .unwrap();
        let err = client_error(tls, &ca).await;
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                        | CertificateError::NotValidForNameContext { .. }
                )
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn client_refuses_an_expired_certificate() {
        let (dir, ca) = (Dir::new(), Ca::new());
        let key = KeyPair::generate().unwrap();
        let mut params = leaf_params();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        let tls = load(&dir, &ca.chain(&cert), &key.serialize_pem())
            .unwrap()
            .unwrap();
        let err = client_error(tls, &ca).await;
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. }
                )
            ),
            "{err:?}"
        );
    }

    fn load_error(cert: Option<&Path>, key: Option<&Path>) -> TlsError {
        match Tls::load(cert, key) {
            Ok(_) => panic!("{cert:?} and {key:?} must not load"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_a_tls_key_error() {
        let (dir, ca) = (Dir::new(), Ca::new());
        let (chain, _) = ca.leaf();
        let (_, other_key) = ca.leaf();
        let cert = dir.file("cert.pem", chain);
        let key = dir.file("key.pem", other_key);
        let err = load_error(Some(&cert), Some(&key));
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
        assert_eq!(err.argument(), "tls_key");
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn bad_arguments_name_the_one_to_fix() {
        let (dir, ca) = (Dir::new(), Ca::new());
        let (chain, key) = ca.leaf();
        let cert = dir.file("cert.pem", &chain);
        let key = dir.file("key.pem", &key);
        let missing = dir.0.join("missing.pem");
        let garbage = dir.file("garbage.pem", "not a PEM file\n");
        let truncated = dir.file("truncated.pem", &chain[..chain.find("-----END").unwrap()]);
        let not_x509 = dir.file(
            "not-x509.pem",
            "-----BEGIN CERTIFICATE-----\nAAECAw==\n-----END CERTIFICATE-----\n",
        );
        let unsupported_key = dir.file(
            "unsupported-key.pem",
            "-----BEGIN PRIVATE KEY-----\nAAECAw==\n-----END PRIVATE KEY-----\n",
        );
        let cases: [(Option<&Path>, Option<&Path>, &str); 11] = [
            (Some(&cert), None, "tls_key"),
            (None, Some(&key), "tls_cert"),
            (Some(&missing), Some(&key), "tls_cert"),
            (Some(&garbage), Some(&key), "tls_cert"),
            (Some(&truncated), Some(&key), "tls_cert"),
            (Some(&not_x509), Some(&key), "tls_cert"),
            // The two swapped.
            (Some(&key), Some(&cert), "tls_cert"),
            (Some(&cert), Some(&missing), "tls_key"),
            (Some(&cert), Some(&garbage), "tls_key"),
            (Some(&cert), Some(&cert), "tls_key"),
            (Some(&cert), Some(&unsupported_key), "tls_key"),
        ];
        for (cert, key, argument) in cases {
            let err = load_error(cert, key);
            assert_eq!(err.argument(), argument, "{cert:?}, {key:?}: {err}");
            let message = err.to_string();
            assert!(message.starts_with(argument), "{message}");
            for path in [cert, key].into_iter().flatten() {
                if err.argument() == "tls_cert" && Some(path) == cert
                    || err.argument() == "tls_key" && Some(path) == key
                {
                    assert!(message.contains(&*path.to_string_lossy()), "{message}");
                }
            }
        }
        assert!(Tls::load(None, None).unwrap().is_none());
        // A chain and its key in one file is fine.
        let both = dir.file(
            "both.pem",
            format!("{chain}{}", std::fs::read_to_string(&key).unwrap()),
        );
        assert!(Tls::load(Some(&both), Some(&both)).unwrap().is_some());
    }

    #[tokio::test]
    async fn plain_http_gets_a_400_and_no_upgrade() {
        let (dir, ca) = (Dir::new(), Ca::new());
        let (chain, key) = ca.leaf();
        let tls = load(&dir, &chain, &key).unwrap().unwrap();
        let (addr, server) = serve_one(tls, Duration::from_secs(10)).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(
                b"GET /chat HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
                  Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                  Sec-WebSocket-Version: 13\r\n\r\n",
            )
            .await
            .unwrap();
        let mut response = Vec::new();
        client.read_to_end(&mut response).await.unwrap();
        let response = String::from_utf8(response).unwrap();
        assert!(response.starts_with("HTTP/1.1 400 "), "{response}");
        assert!(response.contains("wss://"), "{response}");
        assert!(matches!(
            server.await.unwrap(),
            Ok(Err(AcceptError::PlainHttp))
        ));
    }

    #[tokio::test]
    async fn bytes_that_are_neither_tls_nor_http_get_no_answer() {
        let (dir, ca) = (Dir::new(), Ca::new());
        let (chain, key) = ca.leaf();
        let tls = load(&dir, &chain, &key).unwrap().unwrap();
        let (addr, server) = serve_one(tls, Duration::from_secs(10)).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"\x00\x01\x02\x03").await.unwrap();
        let mut response = Vec::new();
        // Closed with the bytes unread: a reset rather than an end of stream.
        let _ = client.read_to_end(&mut response).await;
        assert!(response.is_empty(), "{response:?}");
        assert!(matches!(
            server.await.unwrap(),
            Ok(Err(AcceptError::NotTls))
        ));
    }

    #[tokio::test]
    async fn a_client_that_stalls_is_dropped_at_the_deadline() {
        let (dir, ca) = (Dir::new(), Ca::new());
        let (chain, key) = ca.leaf();
        let tls = load(&dir, &chain, &key).unwrap().unwrap();
        let limit = Duration::from_millis(300);
        // Silent from the start, and silent after the start of a ClientHello.
        for sent in [&b""[..], &b"\x16\x03\x01\x02\x00\x01"[..]] {
            let (addr, server) = serve_one(tls.clone(), limit).await;
            let mut client = TcpStream::connect(addr).await.unwrap();
            client.write_all(sent).await.unwrap();
            let started = Instant::now();
            assert!(server.await.unwrap().is_err(), "the deadline must end it");
            let waited = started.elapsed();
            assert!(waited < limit + Duration::from_secs(2), "{waited:?}");
            // The server let go of the connection.
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
                .await
                .expect("the server must close the connection");
            assert!(read.map_or(true, |n| n == 0) && rest.is_empty());
        }
    }
}
