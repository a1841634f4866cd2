//! Fetching image URLs for the OpenAI API (`--allow-image-urls`) so that a client cannot make the worker
//! reach what the worker can and the client should not: only `http` URLs without credentials, to hosts
//! whose every address is public (or inside the operator's exception blocks), connected to exactly the
//! addresses checked (no second DNS answer between check and connect), redirects followed by hand and
//! each target checked the same way, the body read only up to the size limit, everything under one time
//! limit. Failures to connect or to get an answer all read "could not be fetched", so the errors do not
//! tell a refused port from a filtered one.
use reqwest::header::LOCATION;
use reqwest::{StatusCode, Url};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

/// Limits and exceptions for fetching image URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFetchPolicy {
    /// Largest body read; reading stops as soon as it is exceeded.
    pub max_bytes: usize,
    /// The whole fetch, redirects included.
    pub total_timeout: Duration,
    /// Redirects followed; one more is refused.
    pub max_redirects: usize,
    /// Image URLs in one request; more are refused before anything is fetched.
    pub max_urls_per_request: usize,
    /// Non-public addresses fetched all the same (e.g. an intranet image store).
    pub allowed_addresses: Vec<AddressBlock>,
}

impl ImageFetchPolicy {
    pub const DEFAULT_MAX_BYTES: usize = 20 * 1024 * 1024;
    pub const DEFAULT_TIMEOUT_SECONDS: u64 = 20;
    pub const DEFAULT_MAX_REDIRECTS: usize = 3;
    /// A conversation resent with its history carries each earlier image again: 4 allows a few turns with
    /// an image each while bounding one request to 4 fetches (4 x 20 MiB, 4 x 20 s).
    pub const DEFAULT_MAX_URLS_PER_REQUEST: usize = 4;

    fn allows(&self, address: IpAddr) -> bool {
        self.allowed_addresses.iter().any(|block| block.contains(address))
    }
}

impl Default for ImageFetchPolicy {
    fn default() -> Self {
        Self {
            max_bytes: Self::DEFAULT_MAX_BYTES,
            total_timeout: Duration::from_secs(Self::DEFAULT_TIMEOUT_SECONDS),
            max_redirects: Self::DEFAULT_MAX_REDIRECTS,
            max_urls_per_request: Self::DEFAULT_MAX_URLS_PER_REQUEST,
            allowed_addresses: Vec::new(),
        }
    }
}

/// A block of addresses, written `ADDRESS/PREFIX-LENGTH` (`10.1.0.0/16`, `fd00::/8`); a bare address is
/// the block of that one address. IPv4-mapped IPv6 addresses belong to the IPv4 blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressBlock {
    network: IpAddr,
    prefix_len: u32,
}

impl AddressBlock {
    pub fn new(address: IpAddr, prefix_len: u32) -> Result<Self, String> {
        let (address, prefix_len) = match address {
            // An IPv4-mapped block is the IPv4 block, which is what addresses are compared with.
            IpAddr::V6(v6) if prefix_len >= 96 && v6.to_ipv4_mapped().is_some() => {
                (IpAddr::V4(v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED)), prefix_len - 96)
            }
            other => (other, prefix_len),
        };
        let bits = address_bits(address).1;
        if prefix_len > bits {
            return Err(format!("prefix length /{prefix_len} is longer than the {bits} bits of {address}"));
        }
        Ok(Self { network: address, prefix_len })
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        let (value, bits) = address_bits(address.to_canonical());
        let (network, network_bits) = address_bits(self.network);
        bits == network_bits && in_prefix(value, network, bits, self.prefix_len)
    }
}

impl FromStr for AddressBlock {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let invalid =
            || format!("`{text}` is not an address block (ADDRESS/PREFIX-LENGTH, e.g. 10.1.0.0/16 or fd00::/8)");
        let (address, prefix_len) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix.parse::<u32>().map_err(|_| invalid())?)),
            None => (text, None),
        };
        let address: IpAddr = address.parse().map_err(|_| invalid())?;
        AddressBlock::new(address, prefix_len.unwrap_or(address_bits(address).1)).map_err(|e| format!("`{text}`: {e}"))
    }
}

impl fmt::Display for AddressBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// An address as a number and its width in bits.
fn address_bits(address: IpAddr) -> (u128, u32) {
    match address {
        IpAddr::V4(v4) => (u32::from(v4).into(), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

/// Whether the first `prefix_len` of the `bits` bits of `value` and `network` agree.
fn in_prefix(value: u128, network: u128, bits: u32, prefix_len: u32) -> bool {
    let ignored = bits - prefix_len.min(bits);
    ignored >= 128 || (value >> ignored) == (network >> ignored)
}

/// The kinds of address that are not on the public internet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonPublic {
    Unspecified,
    Loopback,
    Private,
    LinkLocal,
    SharedCgnat,
    Multicast,
    Broadcast,
    Documentation,
    Benchmarking,
    Reserved,
}

impl fmt::Display for NonPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NonPublic::Unspecified => "an unspecified address",
            NonPublic::Loopback => "a loopback address",
            NonPublic::Private => "a private address",
            NonPublic::LinkLocal => "a link-local address",
            NonPublic::SharedCgnat => "a shared (carrier-grade NAT) address",
            NonPublic::Multicast => "a multicast address",
            NonPublic::Broadcast => "the broadcast address",
            NonPublic::Documentation => "a documentation address",
            NonPublic::Benchmarking => "a benchmarking address",
            NonPublic::Reserved => "a reserved address",
        })
    }
}

/// IPv4 blocks that are not public (IANA's special-purpose registry), most specific first.
const NON_PUBLIC_V4: [([u8; 4], u32, NonPublic); 16] = [
    ([0, 0, 0, 0], 8, NonPublic::Unspecified),
    ([10, 0, 0, 0], 8, NonPublic::Private),
    ([100, 64, 0, 0], 10, NonPublic::SharedCgnat),
    ([127, 0, 0, 0], 8, NonPublic::Loopback),
    ([169, 254, 0, 0], 16, NonPublic::LinkLocal),
    ([172, 16, 0, 0], 12, NonPublic::Private),
    ([192, 0, 0, 0], 24, NonPublic::Reserved),
    ([192, 0, 2, 0], 24, NonPublic::Documentation),
    ([192, 88, 99, 0], 24, NonPublic::Reserved),
    ([192, 168, 0, 0], 16, NonPublic::Private),
    ([198, 18, 0, 0], 15, NonPublic::Benchmarking),
    ([198, 51, 100, 0], 24, NonPublic::Documentation),
    ([203, 0, 113, 0], 24, NonPublic::Documentation),
    ([224, 0, 0, 0], 4, NonPublic::Multicast),
    ([255, 255, 255, 255], 32, NonPublic::Broadcast),
    ([240, 0, 0, 0], 4, NonPublic::Reserved),
];

/// IPv6 blocks that are not public, most specific first; outside them only 2000::/3 is public.
const NON_PUBLIC_V6: [(u128, u32, NonPublic); 11] = [
    (0, 128, NonPublic::Unspecified),
    (1, 128, NonPublic::Loopback),
    // IPv4-compatible addresses (deprecated).
    (0, 96, NonPublic::Reserved),
    // Local-use NAT64.
    (0x0064_ff9b_0001 << 80, 48, NonPublic::Private),
    // Discard-only.
    (0x0100 << 112, 64, NonPublic::Reserved),
    (0x2001_0db8 << 96, 32, NonPublic::Documentation),
    // Teredo tunnels.
    (0x2001 << 112, 32, NonPublic::Reserved),
    (0xfc00 << 112, 7, NonPublic::Private),
    (0xfe80 << 112, 10, NonPublic::LinkLocal),
    // Site-local (deprecated).
    (0xfec0 << 112, 10, NonPublic::Private),
    (0xff00 << 112, 8, NonPublic::Multicast),
];

/// Why `address` is not public, or `None` when it is. IPv6 forms that carry an IPv4 address (mapped,
/// NAT64, 6to4) are judged by the IPv4 address they reach.
pub fn non_public_kind(address: IpAddr) -> Option<NonPublic> {
    match address {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(address: Ipv4Addr) -> Option<NonPublic> {
    let value = u32::from(address).into();
    NON_PUBLIC_V4
        .iter()
        .find(|(network, prefix_len, _)| in_prefix(value, u32::from_be_bytes(*network).into(), 32, *prefix_len))
        .map(|(_, _, kind)| *kind)
}

fn non_public_v6(address: Ipv6Addr) -> Option<NonPublic> {
    if let Some(v4) = address.to_ipv4_mapped() {
        return non_public_v4(v4);
    }
    let value = u128::from(address);
    // The low 32 bits of well-known NAT64 (64:ff9b::/96), bits 16..48 of 6to4 (2002::/16).
    if in_prefix(value, 0x0064_ff9b << 96, 128, 96) {
        return non_public_v4(Ipv4Addr::from(value as u32));
    }
    if in_prefix(value, 0x2002 << 112, 128, 16) {
        return non_public_v4(Ipv4Addr::from((value >> 80) as u32));
    }
    let listed = NON_PUBLIC_V6
        .iter()
        .find(|(network, prefix_len, _)| in_prefix(value, *network, 128, *prefix_len))
        .map(|(_, _, kind)| *kind);
    listed.or_else(|| (!in_prefix(value, 0x2000 << 112, 128, 3)).then_some(NonPublic::Reserved))
}

/// What was wrong with an image URL or its fetch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchRefusal {
    #[error("not a valid URL")]
    NotAUrl,
    #[error("scheme `{0}` is not fetched (only http)")]
    Scheme(String),
    #[error("https is not fetched: this server is built without TLS; send the image as a data: URL")]
    Https,
    #[error("URLs with a user name or password are not fetched")]
    Credentials,
    #[error("resolves to {0}; only public addresses are fetched")]
    NonPublicAddress(NonPublic),
    #[error("does not resolve to any address")]
    Unresolvable,
    #[error("more than {0} redirects")]
    TooManyRedirects(usize),
    #[error("a redirect without a valid Location")]
    BadRedirect,
    #[error("answered HTTP {0}")]
    HttpStatus(u16),
    #[error("larger than {0} bytes, the limit for fetched images")]
    TooLarge(usize),
    #[error("took longer than {} s, the limit for fetching an image", .0.as_secs_f64())]
    TimedOut(Duration),
    /// Every failure to connect, to get an answer or to read it: the cause is not told.
    #[error("could not be fetched")]
    Unreachable,
}

/// A refused or failed image fetch: which host (after how many redirects) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFetchError {
    /// The host refused or being fetched; `None` when the URL has none.
    pub host: Option<String>,
    pub redirects: usize,
    pub refusal: FetchRefusal,
}

impl fmt::Display for ImageFetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redirects = match self.redirects {
            0 => String::new(),
            1 => " (after 1 redirect)".to_string(),
            n => format!(" (after {n} redirects)"),
        };
        match &self.host {
            Some(host) => write!(f, "host {host}{redirects}: {}", self.refusal),
            None => write!(f, "{}{redirects}", self.refusal),
        }
    }
}

impl std::error::Error for ImageFetchError {}

/// Where a fetch has got to, kept outside the timed future so that a timeout can say where it struck.
#[derive(Default)]
struct Progress {
    host: Option<String>,
    redirects: usize,
    /// The final answer's headers have arrived: a timeout from now on is a slow body.
    answered: bool,
}

impl Progress {
    fn error(&self, refusal: FetchRefusal) -> ImageFetchError {
        ImageFetchError { host: self.host.clone(), redirects: self.redirects, refusal }
    }
}

/// Fetches the image at `url` under `policy` (see the module's description).
pub async fn fetch_image(url: &str, policy: &ImageFetchPolicy) -> Result<Vec<u8>, ImageFetchError> {
    let mut progress = Progress::default();
    let fetched = tokio::time::timeout(policy.total_timeout, follow_redirects(url, policy, &mut progress)).await;
    match fetched {
        Ok(result) => result,
        // No answer in time reads as a refused connection does.
        Err(_) if !progress.answered => Err(progress.error(FetchRefusal::Unreachable)),
        Err(_) => Err(progress.error(FetchRefusal::TimedOut(policy.total_timeout))),
    }
}

async fn follow_redirects(
    url: &str,
    policy: &ImageFetchPolicy,
    progress: &mut Progress,
) -> Result<Vec<u8>, ImageFetchError> {
    let mut url = Url::parse(url).map_err(|_| progress.error(FetchRefusal::NotAUrl))?;
    loop {
        progress.host = url.host_str().filter(|host| !host.is_empty()).map(str::to_string);
        let addresses = checked_addresses(&url, policy).await.map_err(|refusal| progress.error(refusal))?;
        let client = pinned_client(&url, &addresses).map_err(|refusal| progress.error(refusal))?;
        let mut reply = client.get(url.clone()).send().await.map_err(|_| progress.error(FetchRefusal::Unreachable))?;
        let status = reply.status();
        if is_redirect(status) {
            if progress.redirects == policy.max_redirects {
                return Err(progress.error(FetchRefusal::TooManyRedirects(policy.max_redirects)));
            }
            let next = reply
                .headers()
                .get(LOCATION)
                .and_then(|location| location.to_str().ok())
                .and_then(|location| url.join(location).ok())
                .ok_or_else(|| progress.error(FetchRefusal::BadRedirect))?;
            progress.redirects += 1;
            url = next;
            continue;
        }
        progress.answered = true;
        if !status.is_success() {
            return Err(progress.error(FetchRefusal::HttpStatus(status.as_u16())));
        }
        let too_large = || progress.error(FetchRefusal::TooLarge(policy.max_bytes));
        if reply.content_length().is_some_and(|length| length > policy.max_bytes as u64) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = reply.chunk().await.map_err(|_| progress.error(FetchRefusal::Unreachable))? {
            if body.len() + chunk.len() > policy.max_bytes {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        return Ok(body);
    }
}

/// The address of a URL host written as one (`192.0.2.1`, `[2001:db8::1]`); the URL parser has already
/// turned IPv4's other spellings (`2130706433`, `0x7f.1`) into the dotted form.
fn address_literal(host: &str) -> Option<IpAddr> {
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host).parse().ok()
}

fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// The addresses `url` may be fetched from: every address of its host must be public or allowed.
async fn checked_addresses(url: &Url, policy: &ImageFetchPolicy) -> Result<Vec<SocketAddr>, FetchRefusal> {
    match url.scheme() {
        "http" => {}
        "https" => return Err(FetchRefusal::Https),
        other => return Err(FetchRefusal::Scheme(other.to_string())),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(FetchRefusal::Credentials);
    }
    let port = url.port_or_known_default().ok_or(FetchRefusal::NotAUrl)?;
    let host = url.host_str().ok_or(FetchRefusal::NotAUrl)?;
    let addresses: Vec<SocketAddr> = match address_literal(host) {
        Some(address) => vec![SocketAddr::new(address, port)],
        None => tokio::net::lookup_host((host, port)).await.map_err(|_| FetchRefusal::Unresolvable)?.collect(),
    };
    if addresses.is_empty() {
        return Err(FetchRefusal::Unresolvable);
    }
    for address in &addresses {
        if let Some(kind) = non_public_kind(address.ip()).filter(|_| !policy.allows(address.ip())) {
            return Err(FetchRefusal::NonPublicAddress(kind));
        }
    }
    Ok(addresses)
}

/// A client for one fetch that connects to `url`'s host only at `addresses`, follows no redirect and
/// uses no proxy (a proxy would resolve the host again).
fn pinned_client(url: &Url, addresses: &[SocketAddr]) -> Result<reqwest::Client, FetchRefusal> {
    let mut builder = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).no_proxy().referer(false);
    if let Some(domain) = url.host_str().filter(|host| address_literal(host).is_none()) {
        builder = builder.resolve_to_addrs(domain, addresses);
    }
    builder.build().map_err(|_| FetchRefusal::Unreachable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(address: &str) -> Option<NonPublic> {
        non_public_kind(address.parse().unwrap())
    }

    #[test]
    fn ipv4_addresses_are_classified() {
        let cases = [
            ("0.0.0.0", Some(NonPublic::Unspecified)),
            ("10.1.2.3", Some(NonPublic::Private)),
            ("100.64.0.1", Some(NonPublic::SharedCgnat)),
            ("100.127.255.255", Some(NonPublic::SharedCgnat)),
            ("100.128.0.1", None),
            ("127.0.0.1", Some(NonPublic::Loopback)),
            ("127.255.0.2", Some(NonPublic::Loopback)),
            ("169.254.169.254", Some(NonPublic::LinkLocal)),
            ("172.15.255.255", None),
            ("172.16.0.1", Some(NonPublic::Private)),
            ("172.31.255.255", Some(NonPublic::Private)),
            ("172.32.0.1", None),
            ("192.0.2.7", Some(NonPublic::Documentation)),
            ("192.168.1.1", Some(NonPublic::Private)),
            ("198.18.0.1", Some(NonPublic::Benchmarking)),
            ("224.0.0.1", Some(NonPublic::Multicast)),
            ("239.255.255.250", Some(NonPublic::Multicast)),
            ("240.0.0.1", Some(NonPublic::Reserved)),
            ("255.255.255.255", Some(NonPublic::Broadcast)),
            ("1.1.1.1", None),
            ("8.8.8.8", None),
            ("93.184.216.34", None),
        ];
        for (address, expected) in cases {
            assert_eq!(kind(address), expected, "{address}");
        }
    }

    #[test]
    fn ipv6_addresses_are_classified() {
        let cases = [
            ("::", Some(NonPublic::Unspecified)),
            ("::1", Some(NonPublic::Loopback)),
            ("::127.0.0.1", Some(NonPublic::Reserved)),
            ("fc00::1", Some(NonPublic::Private)),
            ("fd12:3456::1", Some(NonPublic::Private)),
            ("fe80::1", Some(NonPublic::LinkLocal)),
            ("febf::1", Some(NonPublic::LinkLocal)),
            ("fec0::1", Some(NonPublic::Private)),
            ("ff02::1", Some(NonPublic::Multicast)),
            ("2001:db8::1", Some(NonPublic::Documentation)),
            ("2001:0:4136:e378::1", Some(NonPublic::Reserved)),
            ("100::1", Some(NonPublic::Reserved)),
            ("64:ff9b:1::1", Some(NonPublic::Private)),
            ("4000::1", Some(NonPublic::Reserved)),
            ("2606:4700:4700::1111", None),
            ("2a00:1450:4001::1", None),
        ];
        for (address, expected) in cases {
            assert_eq!(kind(address), expected, "{address}");
        }
    }

    #[test]
    fn ipv6_forms_of_ipv4_addresses_are_judged_by_the_ipv4_address() {
        let cases = [
            ("::ffff:127.0.0.1", Some(NonPublic::Loopback)),
            ("::ffff:169.254.169.254", Some(NonPublic::LinkLocal)),
            ("::ffff:10.0.0.1", Some(NonPublic::Private)),
            ("::ffff:8.8.8.8", None),
            ("64:ff9b::a00:1", Some(NonPublic::Private)),
            ("64:ff9b::a9fe:a9fe", Some(NonPublic::LinkLocal)),
            ("64:ff9b::808:808", None),
            ("2002:7f00:1::1", Some(NonPublic::Loopback)),
            ("2002:c0a8:101::1", Some(NonPublic::Private)),
            ("2002:808:808::1", None),
        ];
        for (address, expected) in cases {
            assert_eq!(kind(address), expected, "{address}");
        }
    }

    #[test]
    fn address_blocks_parse_and_match() {
        let block: AddressBlock = "127.0.0.2/32".parse().unwrap();
        assert!(block.contains("127.0.0.2".parse().unwrap()));
        assert!(block.contains("::ffff:127.0.0.2".parse().unwrap()), "mapped form of an IPv4 address");
        assert!(!block.contains("127.0.0.1".parse().unwrap()));
        assert!(!block.contains("::1".parse().unwrap()));
        let intranet: AddressBlock = "10.20.0.0/16".parse().unwrap();
        assert!(intranet.contains("10.20.255.1".parse().unwrap()));
        assert!(!intranet.contains("10.21.0.1".parse().unwrap()));
        let v6: AddressBlock = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fc00::1".parse().unwrap()));
        let mapped: AddressBlock = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(mapped.to_string(), "10.0.0.0/8");
        let everything: AddressBlock = "0.0.0.0/0".parse().unwrap();
        assert!(everything.contains("192.168.0.1".parse().unwrap()));
        assert_eq!("192.168.1.1".parse::<AddressBlock>().unwrap().to_string(), "192.168.1.1/32");
        for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "10.0.0.0/x", "intranet"] {
            let error = bad.parse::<AddressBlock>().unwrap_err();
            assert!(error.contains(bad), "{bad}: {error}");
        }
    }

    #[tokio::test]
    async fn urls_are_checked_before_anything_is_resolved_or_connected() {
        let policy = ImageFetchPolicy::default();
        let cases = [
            ("not a url", FetchRefusal::NotAUrl),
            ("ftp://example.com/cat.png", FetchRefusal::Scheme("ftp".into())),
            ("file:///etc/passwd", FetchRefusal::Scheme("file".into())),
            ("https://example.com/cat.png", FetchRefusal::Https),
            ("http://user:secret@example.com/cat.png", FetchRefusal::Credentials),
            ("http://169.254.169.254/latest/meta-data/", FetchRefusal::NonPublicAddress(NonPublic::LinkLocal)),
            ("http://[::ffff:169.254.169.254]/", FetchRefusal::NonPublicAddress(NonPublic::LinkLocal)),
            ("http://2130706433/", FetchRefusal::NonPublicAddress(NonPublic::Loopback)),
            ("http://0x7f.1/", FetchRefusal::NonPublicAddress(NonPublic::Loopback)),
            ("http://[fe80::1]/", FetchRefusal::NonPublicAddress(NonPublic::LinkLocal)),
            ("http://0.0.0.0:8080/", FetchRefusal::NonPublicAddress(NonPublic::Unspecified)),
        ];
        for (url, expected) in cases {
            let error = fetch_image(url, &policy).await.unwrap_err();
            assert_eq!(error.refusal, expected, "{url}: {error}");
        }
    }
}
