//! Request ids: 16 hex digits, unique within a process and unpredictable across processes
//! (a per-process random key scrambles a counter with a bijective mix).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// Hands out request ids.
#[derive(Debug)]
pub struct RequestIds {
    key: u64,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(std::process::id() as u64);
        RequestIds {
            key: h.finish(),
            next: AtomicU64::new(1),
        }
    }
}

fn mix(mut z: u64) -> u64 {
    // splitmix64's finaliser: a bijection on u64.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl RequestIds {
    /// How many ids were handed out so far.
    pub fn issued(&self) -> u64 {
        self.next.load(Ordering::Relaxed) - 1
    }

    /// The next id.
    pub fn next_id(&self) -> RequestId {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let v = mix(n ^ self.key);
        let mut text = [0u8; 16];
        for (i, digit) in text.iter_mut().enumerate() {
            *digit = HEX[((v >> (60 - 4 * i)) & 0xf) as usize];
        }
        RequestId(text)
    }
}

/// One request id: 16 hex digits, held without an allocation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequestId([u8; 16]);

impl RequestId {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::ops::Deref for RequestId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_hex() {
        let ids = RequestIds::default();
        let a = ids.next_id();
        let b = ids.next_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(ids.issued(), 2);
    }
}
