//! Static files on the WebSocket port: plain HTTP GET/HEAD requests are
//! answered from one folder, so an app's page and its socket share an origin.
//!
//! A request can never reach outside the folder: `..` segments (also
//! percent-encoded) are refused, and the resolved path — symlinks followed —
//! must still lie inside the folder's canonical path.
//!
//! The upgrade calls it for plain HTTP requests.

use std::io;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use percent_encoding::percent_decode_str;

/// Files above this size are refused: they are app assets, not downloads.
const MAX_FILE_BYTES: u64 = 64 << 20;

pub struct StaticFiles {
    /// Canonical path of the folder.
    root: PathBuf,
}

impl StaticFiles {
    pub fn new(dir: &Path) -> io::Result<Self> {
        let root = dir.canonicalize()?;
        if !root.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", dir.display()),
            ));
        }
        Ok(StaticFiles { root })
    }

    /// The file a request target names, if it is inside the folder.
    pub fn resolve(&self, target: &str) -> Option<PathBuf> {
        let path = target.split(['?', '#']).next().unwrap_or("");
        let decoded = percent_decode_str(path).decode_utf8().ok()?;
        if decoded.contains('\0') || decoded.contains('\\') {
            return None;
        }
        let mut full = self.root.clone();
        for part in decoded.split('/') {
            match part {
                "" | "." => {}
                ".." => return None,
                part => full.push(part),
            }
        }
        let mut found = full.canonicalize().ok()?;
        if found.is_dir() {
            found = found.join("index.html").canonicalize().ok()?;
        }
        (found.starts_with(&self.root) && found.is_file()).then_some(found)
    }

    /// The complete HTTP response to a plain request (blocking file I/O:
    /// run it off the I/O threads).
    pub fn respond(&self, method: &str, target: &str, headers: &[(String, String)]) -> Vec<u8> {
        let head_only = match method {
            "GET" => false,
            "HEAD" => true,
            _ => {
                return response(
                    405,
                    "Method Not Allowed",
                    &[("Allow", "GET, HEAD".into())],
                    b"method not allowed\n",
                    false,
                )
            }
        };
        let Some(path) = self.resolve(target) else {
            return not_found(head_only);
        };
        let Ok(meta) = std::fs::metadata(&path) else {
            return not_found(head_only);
        };
        if meta.len() > MAX_FILE_BYTES {
            return not_found(head_only);
        }
        let modified = meta.modified().unwrap_or(UNIX_EPOCH);
        let nanos = modified
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let etag = format!("\"{:x}-{:x}\"", meta.len(), nanos);
        let last_modified = httpdate::fmt_http_date(modified);
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let fresh = match (header("if-none-match"), header("if-modified-since")) {
            (Some(tags), _) => tags.split(',').any(|t| {
                t.trim() == etag
                    || t.trim() == "*"
                    || t.trim().strip_prefix("W/") == Some(etag.as_str())
            }),
            (None, Some(since)) => httpdate::parse_http_date(since).is_ok_and(|since| {
                modified
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
                    <= since.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
            }),
            (None, None) => false,
        };
        let validators = [("ETag", etag), ("Last-Modified", last_modified)];
        if fresh {
            return response(304, "Not Modified", &validators, b"", true);
        }
        let Ok(body) = std::fs::read(&path) else {
            return not_found(head_only);
        };
        let mut fields = vec![("Content-Type", content_type(&path).to_owned())];
        fields.extend(validators);
        response(200, "OK", &fields, &body, head_only)
    }
}

fn not_found(head_only: bool) -> Vec<u8> {
    response(
        404,
        "Not Found",
        &[("Content-Type", "text/plain; charset=utf-8".into())],
        b"not found\n",
        head_only,
    )
}

fn response(
    status: u16,
    text: &str,
    fields: &[(&str, String)],
    body: &[u8],
    head_only: bool,
) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {text}\r\n");
    for (name, value) in fields {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if status != 304 {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut out = out.into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        "wasm" => "application/wasm",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> (PathBuf, StaticFiles) {
        let base = std::env::temp_dir().join(format!(
            "warpsocket-static-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("site/sub")).unwrap();
        std::fs::write(base.join("site/index.html"), "<h1>hi</h1>").unwrap();
        std::fs::write(base.join("site/sub/app.js"), "x()").unwrap();
        std::fs::write(base.join("secret.txt"), "no").unwrap();
        std::os::unix::fs::symlink(base.join("secret.txt"), base.join("site/leak.txt")).unwrap();
        let files = StaticFiles::new(&base.join("site")).unwrap();
        (base, files)
    }

    fn status(response: &[u8]) -> u16 {
        std::str::from_utf8(&response[9..12])
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn serves_files_with_types_and_validators() {
        let (_base, files) = site();
        let index = files.respond("GET", "/", &[]);
        let text = String::from_utf8(index).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("Content-Type: text/html; charset=utf-8\r\n"));
        assert!(text.ends_with("\r\n\r\n<h1>hi</h1>"));
        let etag = text
            .lines()
            .find_map(|l| l.strip_prefix("ETag: "))
            .unwrap()
            .to_owned();
        assert_eq!(
            status(&files.respond("GET", "/index.html", &[("if-none-match".into(), etag)])),
            304
        );
        let js = String::from_utf8(files.respond("HEAD", "/sub/app.js?v=1", &[])).unwrap();
        assert!(js.contains("text/javascript") && js.ends_with("\r\n\r\n"));
        assert_eq!(status(&files.respond("POST", "/", &[])), 405);
    }

    #[test]
    fn never_leaves_the_folder() {
        let (base, files) = site();
        for target in [
            "/../secret.txt",
            "/%2e%2e/secret.txt",
            "/sub/%2E%2E/%2e%2e/secret.txt",
            "/leak.txt",
            "/missing",
            "/sub/..%2f..%2fsecret.txt",
            "/%00",
        ] {
            assert_eq!(status(&files.respond("GET", target, &[])), 404, "{target}");
        }
        let absolute = format!("/{}", base.join("secret.txt").display());
        assert_eq!(status(&files.respond("GET", &absolute, &[])), 404);
        assert_eq!(status(&files.respond("GET", "//sub//app.js", &[])), 200);
    }
}
