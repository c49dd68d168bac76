//! Who may call: the Host/authority guard against DNS rebinding and the bearer token.

use std::net::{IpAddr, Ipv6Addr};

use http::{header, Request};
use hyper::body::Incoming;
use subtle::ConstantTimeEq;

/// DNS-rebinding guard: the request's authority (its `Host`, or the authority of an
/// absolute-form target) must name loopback or the address we listen on. The authority is
/// parsed strictly (RFC 3986 host and an optional numeric port, nothing else), so names such
/// as `[::1]evil.com` or `127.0.0.1:8377/evil` are refused.
pub fn host_allowed(authority: &str, listen_ip: Option<IpAddr>) -> bool {
    let Some(host) = authority_host(authority) else {
        return false;
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback() || Some(ip) == listen_ip.filter(|l| !l.is_unspecified()),
        Err(_) => false,
    }
}

/// The host part of `host[:port]` or `[v6][:port]`, or `None` when it is not exactly that.
fn authority_host(authority: &str) -> Option<&str> {
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => {
            let (v6, after) = rest.split_once(']')?;
            v6.parse::<Ipv6Addr>().ok()?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':')?),
            };
            (v6, port)
        }
        None => match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    if let Some(port) = port {
        if port.is_empty()
            || !port.bytes().all(|b| b.is_ascii_digit())
            || port.parse::<u16>().is_err()
        {
            return None;
        }
    }
    let reg_name = |h: &str| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    (authority.starts_with('[') || reg_name(host)).then_some(host)
}

/// The authority a request names: an absolute-form target's, else its one `Host` header.
/// `Err` when it names two (RFC 9112: 400).
pub(super) fn request_authority(req: &Request<Incoming>) -> Result<Option<&str>, ()> {
    if let Some(authority) = req.uri().authority() {
        return Ok(Some(authority.as_str()));
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(());
    }
    Ok(first.and_then(|h| h.to_str().ok()))
}
pub(super) fn bearer_matches(headers: &header::HeaderMap, token: &[u8]) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    // RFC 9110: the scheme name is case-insensitive.
    let value = value.as_bytes();
    let Some((scheme, given)) = value.split_at_checked(7) else {
        return false;
    };
    scheme.eq_ignore_ascii_case(b"Bearer ") && bool::from(given.ct_eq(token))
}

#[cfg(test)]
mod tests;
