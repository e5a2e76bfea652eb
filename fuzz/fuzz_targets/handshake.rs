//! Feeds arbitrary bytes into `handshake::parse`, the HTTP/1.1 upgrade parser.
//!
//! Besides not panicking, a complete request must be reported with `used` within
//! the buffer, parse the same from exactly its own `used` bytes (bytes after the
//! request, i.e. the client's first frames, must not change it), and every shorter
//! prefix must ask for more bytes rather than fail (the server parses the request
//! as it arrives, so a request split by TCP must not be refused).
#![no_main]

use libfuzzer_sys::fuzz_target;
use warpsocket_core::handshake::{parse, refusal_response};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(Some((request, used))) => {
            assert!(
                used > 0 && used <= data.len(),
                "used {used} of {}",
                data.len()
            );
            let exact = parse(&data[..used]);
            assert_eq!(
                exact,
                Ok(Some((request, used))),
                "request parsed differently alone"
            );
            for cut in [used - 1, used / 2, 1] {
                if cut < used {
                    assert_eq!(
                        parse(&data[..cut]),
                        Ok(None),
                        "prefix of {cut} bytes not partial"
                    );
                }
            }
        }
        Ok(None) => {}
        Err(refusal) => {
            let response = refusal_response(refusal);
            assert!(response.starts_with(b"HTTP/1.1 "), "bad refusal response");
        }
    }
});
