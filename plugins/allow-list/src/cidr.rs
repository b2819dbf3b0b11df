//! CIDR blocks, parsed by hand with `std::net` (a crate would add size for forty lines).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IPv4 or IPv6 network: an address with its host bits zero and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside the block. IPv4 blocks match only IPv4 addresses (the SDK
    /// already turns IPv4-mapped IPv6 client addresses into IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => u32::from(ip) & mask32(self.prefix) == u32::from(net),
            (IpAddr::V6(net), IpAddr::V6(ip)) => u128::from(ip) & mask128(self.prefix) == u128::from(net),
            _ => false,
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = String;

    /// `ADDRESS/PREFIX`, or a bare address meaning that one host. An address with host
    /// bits set (`10.1.2.3/8`) is refused rather than silently widened or narrowed.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR block: {addr:?} is not an IP address"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => {
                    return Err(format!(
                        "{s:?} is not a CIDR block: the prefix length must be 0 to {max}"
                    ));
                }
            },
        };
        let network = match ip {
            IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & mask32(prefix)).into()),
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & mask128(prefix)).into()),
        };
        if network != ip {
            return Err(format!(
                "{s:?} has host bits set (did you mean \"{network}/{prefix}\"?)"
            ));
        }
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().expect("valid CIDR")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("valid IP")
    }

    #[test]
    fn ipv4_blocks() {
        assert!(cidr("10.0.0.0/8").contains(ip("10.255.1.2")));
        assert!(!cidr("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(cidr("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!cidr("127.0.0.1/32").contains(ip("127.0.0.2")));
        assert!(
            !cidr("10.0.0.0/8").contains(ip("::ffff:10.0.0.1")),
            "families never mix"
        );
    }

    #[test]
    fn ipv6_blocks() {
        assert!(cidr("2001:db8::/32").contains(ip("2001:db8:1::5")));
        assert!(!cidr("2001:db8::/32").contains(ip("2001:db9::1")));
        assert!(cidr("::/0").contains(ip("::1")));
        assert!(cidr("::1/128").contains(ip("::1")));
        assert!(!cidr("::1").contains(ip("127.0.0.1")));
    }

    #[test]
    fn bad_blocks_say_why() {
        let err = |s: &str| s.parse::<Cidr>().expect_err("invalid");
        assert_eq!(
            err("10.0.0.0/33"),
            r#""10.0.0.0/33" is not a CIDR block: the prefix length must be 0 to 32"#
        );
        assert_eq!(
            err("::/129"),
            r#""::/129" is not a CIDR block: the prefix length must be 0 to 128"#
        );
        assert_eq!(
            err("10.0.0/8"),
            r#""10.0.0/8" is not a CIDR block: "10.0.0" is not an IP address"#
        );
        assert_eq!(
            err("10.1.2.3/8"),
            r#""10.1.2.3/8" has host bits set (did you mean "10.0.0.0/8"?)"#
        );
        assert_eq!(
            err("10.0.0.0/x"),
            r#""10.0.0.0/x" is not a CIDR block: the prefix length must be 0 to 32"#
        );
    }
}
