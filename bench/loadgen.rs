//! A small load tool for `bench/run.sh`, std only, compiled with `rustc -O` (no Cargo, no
//! dependencies), so the harness needs no extra crate build.
//!
//! ```text
//! loadgen rate ADDR PATH BODY_FILE RATE_PER_S SECONDS CONNECTIONS
//!     Open-loop POSTs at a fixed rate (like wrk2): request k is due at t0 + k/RATE and goes
//!     out on connection k mod CONNECTIONS. Latency runs from the due time, not the send
//!     time, so a slow response also charges the requests queued behind it (no coordinated
//!     omission). Prints one line: `sent ok non2xx errors rate_per_s p50_ms p90_ms p99_ms
//!     p999_ms max_ms`.
//! loadgen ready ADDR TIMEOUT_MS CMD [ARGS...]
//!     Starts CMD, polls `GET /readyz` on ADDR every millisecond and prints the milliseconds
//!     from spawn to the first 200, then stops CMD with SIGTERM and waits for it.
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("rate") if args.len() == 7 => rate(&args[1..]),
        Some("ready") if args.len() >= 4 => ready(&args[1..]),
        _ => Err("usage: loadgen rate ADDR PATH BODY_FILE RATE SECONDS CONNECTIONS | loadgen ready ADDR TIMEOUT_MS CMD [ARGS...]".to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse<T: std::str::FromStr>(what: &str, s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("{what}: cannot parse {s:?}"))
}

/// Reads one HTTP/1.1 response; returns its status code.
fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or(std::io::ErrorKind::InvalidData)?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(status)
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    ok: u64,
    non2xx: u64,
    errors: u64,
}

fn rate(args: &[String]) -> Result<(), String> {
    let addr: SocketAddr = parse("ADDR", &args[0])?;
    let path = &args[1];
    let body = std::fs::read(&args[2]).map_err(|e| format!("{}: {e}", args[2]))?;
    let rate: f64 = parse("RATE", &args[3])?;
    let seconds: f64 = parse("SECONDS", &args[4])?;
    let conns: usize = parse("CONNECTIONS", &args[5])?;
    if !(rate > 0.0 && seconds > 0.0 && conns > 0) {
        return Err("RATE, SECONDS and CONNECTIONS must be positive".to_owned());
    }
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let request = Arc::new(request);
    let total = (rate * seconds) as u64;
    let t0 = Instant::now() + Duration::from_millis(100);
    let threads: Vec<_> = (0..conns)
        .map(|c| {
            let request = request.clone();
            std::thread::spawn(move || {
                let mut tally = Tally::default();
                let mut stream: Option<TcpStream> = None;
                let mut buf = Vec::with_capacity(8192);
                let mut k = c as u64;
                while k < total {
                    let due = t0 + Duration::from_secs_f64(k as f64 / rate);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    if stream.is_none() {
                        stream = TcpStream::connect(addr)
                            .and_then(|s| s.set_nodelay(true).map(|()| s))
                            .ok();
                    }
                    let outcome = match stream.as_mut() {
                        Some(s) => s
                            .write_all(&request)
                            .and_then(|()| read_response(s, &mut buf)),
                        None => Err(std::io::ErrorKind::ConnectionRefused.into()),
                    };
                    match outcome {
                        Ok(status) => {
                            tally
                                .latencies_us
                                .push(due.elapsed().as_micros().try_into().unwrap_or(u64::MAX));
                            if (200..300).contains(&status) {
                                tally.ok += 1;
                            } else {
                                tally.non2xx += 1;
                            }
                        }
                        Err(_) => {
                            tally.errors += 1;
                            stream = None;
                        }
                    }
                    k += conns as u64;
                }
                tally
            })
        })
        .collect();
    let mut all = Tally::default();
    for t in threads {
        let t = t.join().map_err(|_| "a load thread panicked".to_owned())?;
        all.latencies_us.extend(t.latencies_us);
        all.ok += t.ok;
        all.non2xx += t.non2xx;
        all.errors += t.errors;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        let v = &all.latencies_us;
        if v.is_empty() {
            return f64::NAN;
        }
        let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[i.min(v.len() - 1)] as f64 / 1000.0
    };
    println!(
        "sent={} ok={} non2xx={} errors={} rate={:.0} p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} p999_ms={:.2} max_ms={:.2}",
        all.latencies_us.len() as u64 + all.errors,
        all.ok,
        all.non2xx,
        all.errors,
        all.ok as f64 / elapsed,
        pct(50.0),
        pct(90.0),
        pct(99.0),
        pct(99.9),
        pct(100.0),
    );
    Ok(())
}

fn ready(args: &[String]) -> Result<(), String> {
    let addr: SocketAddr = parse("ADDR", &args[0])?;
    let timeout = Duration::from_millis(parse("TIMEOUT_MS", &args[1])?);
    let start = Instant::now();
    let mut child = Command::new(&args[2])
        .args(&args[3..])
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", args[2]))?;
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut buf = Vec::with_capacity(1024);
    let result = loop {
        if start.elapsed() > timeout {
            break Err(format!("not ready within {timeout:?}"));
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(format!("{} exited during start-up: {status}", args[2]));
        }
        let ok = TcpStream::connect_timeout(&addr, Duration::from_millis(100))
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_millis(500)))?;
                s.write_all(request.as_bytes())?;
                read_response(&mut s, &mut buf)
            })
            .is_ok_and(|status| status == 200);
        if ok {
            break Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let elapsed = result?;
    println!("ready_ms={:.1}", elapsed.as_secs_f64() * 1000.0);
    Ok(())
}
