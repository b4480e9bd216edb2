//! Resident memory of this process, for the benchmarks' peak-RSS column (Linux `/proc`; `None`
//! elsewhere). The binary keeps freed memory committed (main.rs), so a process's peak is its
//! own: the CLI runs each benchmark row in a process of its own.

fn status_kb(key: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The process's peak resident size, MiB.
pub fn peak_rss_mb() -> Option<f64> {
    status_kb("VmHWM:").map(|kb| kb / 1024.0)
}

/// The process's resident size now, MiB.
pub fn rss_mb() -> Option<f64> {
    status_kb("VmRSS:").map(|kb| kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_allocation_raises_the_peak() {
        let Some(before) = peak_rss_mb() else {
            return; // not Linux
        };
        let v = vec![1u8; 256 << 20];
        std::hint::black_box(&v);
        assert!(rss_mb().unwrap() >= 200.0);
        assert!(peak_rss_mb().unwrap() >= before.max(200.0));
    }
}
