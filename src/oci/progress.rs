//! Progress lines on stderr, only when stderr is a terminal: what is being
//! done (layer N of M) and how many bytes so far, redrawn at most five
//! times a second.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    enabled: bool,
    last: Option<Instant>,
    drawn: bool,
}

impl Progress {
    /// Shows progress if stderr is a terminal.
    pub fn new() -> Progress {
        Progress::with(std::io::stderr().is_terminal())
    }

    pub fn with(enabled: bool) -> Progress {
        Progress {
            enabled,
            last: None,
            drawn: false,
        }
    }

    /// Redraws the line (throttled): `label: 12.3 MB`.
    pub fn update(&mut self, label: &str, bytes: u64) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now - t < Duration::from_millis(200))
        {
            return;
        }
        self.last = Some(now);
        self.drawn = true;
        let mut e = std::io::stderr().lock();
        let _ = write!(e, "\r\x1b[K{label}: {}", human(bytes));
        let _ = e.flush();
    }

    /// Clears the line.
    pub fn done(&mut self) {
        if self.drawn {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
            self.drawn = false;
        }
        self.last = None;
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done();
    }
}

/// A size as docker prints it: `1.23MB`, `512B` (powers of 1000).
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if n < 1000 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1000.0;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    let s = format!("{v:.3}");
    let s = &s[..4.min(s.len())];
    format!(
        "{}{}",
        s.trim_end_matches('0').trim_end_matches('.'),
        UNITS[u]
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_sizes() {
        assert_eq!(super::human(0), "0B");
        assert_eq!(super::human(999), "999B");
        assert_eq!(super::human(1000), "1kB");
        assert_eq!(super::human(1_234_567), "1.23MB");
        assert_eq!(super::human(123_456_789), "123MB");
    }
}
