//! Emulator requests: headers, SigV4, JSON bodies, the admin API and the credential endpoints,
//! through `meterd::emulator::Offline`, the served path without a socket. Nothing may panic,
//! every answer is JSON (STS: XML), and a protocol error names its `__type` (STS: its `Code`).
//!
//! The input is a small HTTP/1 request: `METHOD TARGET`, then `name: value` lines, an empty
//! line and the body (`\n` or `\r\n`). An odd first byte sends it to an emulator that checks
//! signatures (key `AKID`, secret `s3cret`); an even one to the demo, which takes any
//! well-formed signature, so bodies reach the operations.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meterd::clock::ManualClock;
use meterd::emulator::{EmulatorConfig, Offline};

/// 2027-01-15T08:30:00Z, as the emulator tests use.
const T0: i64 = 1_800_001_800;

fn emulators() -> &'static [Offline; 2] {
    static E: OnceLock<[Offline; 2]> = OnceLock::new();
    E.get_or_init(|| {
        let open = EmulatorConfig::demo();
        let mut checked = EmulatorConfig::demo();
        checked
            .credentials
            .insert("AKID".to_owned(), "s3cret".to_owned());
        checked.signature_max_skew = Some(std::time::Duration::from_secs(900));
        [open, checked].map(|config| {
            Offline::new(config, ManualClock::at_unix(T0)).expect("the demo configuration builds")
        })
    })
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, data)) = data.split_first() else {
        return;
    };
    let emulator = &emulators()[usize::from(selector & 1)];
    let mut lines = data.split(|b| *b == b'\n');
    let Some(request_line) = lines.next() else {
        return;
    };
    let (method, target) = match trim_cr(request_line).iter().position(|b| *b == b' ') {
        Some(i) => (&request_line[..i], trim_cr(&request_line[i + 1..])),
        None => return,
    };
    let mut headers = Vec::new();
    let mut consumed = request_line.len() + 1;
    for line in lines.by_ref() {
        consumed += line.len() + 1;
        let line = trim_cr(line);
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            return;
        };
        let value = &line[colon + 1..];
        let start = value.iter().position(|b| *b != b' ').unwrap_or(value.len());
        headers.push((&line[..colon], &value[start..]));
    }
    let body = data.get(consumed..).unwrap_or_default();
    let Ok(answer) = emulator.call(method, target, &headers, body) else {
        return; // HTTP parsing would have refused it before the emulator saw it
    };
    let Some(answer) = answer else {
        return; // an injected dropped connection
    };
    if answer.content_type.as_deref() == Some("text/xml") {
        // STS (a form-encoded POST without X-Amz-Target): a result, or an ErrorResponse with a Code.
        let xml = String::from_utf8_lossy(&answer.body);
        match answer.status {
            200 => assert!(xml.contains("Result>") && xml.contains("Response xmlns="), "{xml}"),
            400 | 500 => assert!(
                xml.starts_with("<ErrorResponse") && !xml.contains("<Code></Code>"),
                "{xml}"
            ),
            other => panic!("STS answered {other}: {xml}"),
        }
        return;
    }
    let container = target.windows(16).any(|w| w == b"/v2/credentials/");
    let json: serde_json::Value = serde_json::from_slice(&answer.body)
        .unwrap_or_else(|e| panic!("status {} answered non-JSON: {e}", answer.status));
    assert!(
        matches!(answer.status, 200 | 201 | 400 | 404 | 413 | 500 | 503),
        "status {}: {json}",
        answer.status
    );
    if container && method == b"GET" && json.get("__type").is_none() {
        // The container credentials endpoint: the document, or a JSON code.
        match answer.status {
            200 => assert!(json["AccessKeyId"].is_string(), "{json}"),
            401 | 403 | 404 => assert!(json["code"].is_string(), "{json}"),
            other => panic!("container endpoint answered {other}: {json}"),
        }
        return;
    }
    let admin = target.starts_with(b"/_emulator/");
    if !admin && answer.status != 200 {
        let kind = json["__type"].as_str().unwrap_or_default();
        assert!(!kind.is_empty(), "no __type: {json}");
        if answer.status >= 500 {
            assert!(
                matches!(kind, "InternalServiceErrorException" | "ServiceUnavailable"),
                "{json}"
            );
        }
    }
});
