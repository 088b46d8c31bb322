//! Byte sizes as people type them on command lines and in the environment
//! (`32MB`, `4GiB`, `1048576`), and as we print them.
//!
//! ServerlessLLM reads `KB`/`MB`/`GB`/`TB` as powers of two (`1GB` is
//! 1073741824 bytes). Operators carry flag values between the two daemons, so
//! we read them the same way; the explicit `KiB`/`MiB`/`GiB`/`TiB` spellings
//! mean the same thing. This is why we parse by hand instead of using a crate
//! whose `MB` is a million bytes.

use std::fmt;
use std::str::FromStr;

/// A number of bytes, parsed from `32MB`, `4GiB`, `512` and the like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The number of bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

/// A size string that is not `<integer>[unit]`, or that overflows 64 bits.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid size {input:?}: {reason}; write a whole number with an optional unit, \
     such as 512, 32MB, 4GiB (units B, KB, MB, GB, TB and KiB..TiB are all powers of 1024)"
)]
pub struct ParseSizeError {
    input: String,
    reason: &'static str,
}

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseSizeError {
            input: input.to_owned(),
            reason,
        };
        let text = input.trim();
        let digits_end = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(digits_end);
        if digits.is_empty() {
            return Err(err("it does not start with a number"));
        }
        let number: u64 = digits.parse().map_err(|_| err("the number is too large"))?;
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            _ => return Err(err("unknown unit")),
        };
        number
            .checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or_else(|| err("the size does not fit in 64 bits"))
    }
}

impl fmt::Display for ByteSize {
    /// Exact when the size is a whole number of a binary unit (`32MiB`),
    /// otherwise the byte count.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u32, &str); 4] = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
        for (shift, name) in UNITS {
            if self.0 != 0 && self.0.is_multiple_of(1u64 << shift) {
                return write!(f, "{}{name}", self.0 >> shift);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// A size for people to read: `1.50 GiB`, `512 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// Throughput in GiB/s; zero when no time elapsed.
pub fn gib_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / seconds / (1u64 << 30) as f64
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_serverlessllm_binary_units() {
        assert_eq!("1GB".parse::<ByteSize>().unwrap().bytes(), 1 << 30);
        assert_eq!("512MB".parse::<ByteSize>().unwrap().bytes(), 512 << 20);
        assert_eq!("32MiB".parse::<ByteSize>().unwrap().bytes(), 32 << 20);
        assert_eq!("4 gib".parse::<ByteSize>().unwrap().bytes(), 4 << 30);
        assert_eq!("4096".parse::<ByteSize>().unwrap().bytes(), 4096);
        assert_eq!("1TB".parse::<ByteSize>().unwrap().bytes(), 1 << 40);
    }

    #[test]
    fn rejects_garbage_with_a_hint() {
        for bad in [
            "",
            "GB",
            "1.5GB",
            "-1",
            "12XB",
            "99999999999999999999",
            "20000000TB",
        ] {
            let err = bad.parse::<ByteSize>().unwrap_err().to_string();
            assert!(err.contains("such as 512, 32MB, 4GiB"), "{bad}: {err}");
        }
    }

    #[test]
    fn displays_exact_units() {
        assert_eq!(ByteSize(32 << 20).to_string(), "32MiB");
        assert_eq!(ByteSize(10 << 30).to_string(), "10GiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
        assert_eq!(human_bytes(1536 << 20), "1.50 GiB");
        assert_eq!(human_bytes(12), "12 B");
    }
}
