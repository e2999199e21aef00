//! FNV-1a (64 bit): a small, stable, dependency-free hash for fingerprints (which manifest lines
//! a shard came from, which data a run trained on, which shipped model a cache folder holds).

#[derive(Clone, Copy, Debug)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xCBF2_9CE4_8422_2325)
    }
}

impl Fnv1a {
    pub fn update(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01B3);
        }
        self
    }

    pub fn finish(&self) -> u64 {
        self.0
    }

    /// The hash as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_test_vectors() {
        // From the FNV reference (draft-eastlake-fnv): FNV-1a 64 of "" and "a".
        assert_eq!(Fnv1a::default().finish(), 0xcbf29ce484222325);
        assert_eq!(Fnv1a::default().update(b"a").finish(), 0xaf63dc4c8601ec8c);
        assert_eq!(Fnv1a::default().update(b"foo").finish(), 0xdcb27518fed9d577);
    }
}
