//! Host-side measurements of VMM processes from /proc: memory (PSS) split into
//! guest memory and the VMM's own, and CPU time.

use std::path::Path;
use std::time::Duration;

/// Proportional set size of one process, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pss {
    pub total: u64,
    /// The part in mappings of the guest memory file (pages the guest touched
    /// and copied, plus its share of the template's page-cache pages).
    pub guest: u64,
}

impl Pss {
    pub fn vmm_overhead(&self) -> u64 {
        self.total.saturating_sub(self.guest)
    }
}

/// Reads /proc/<pid>/smaps; mappings of `guest_memory_file` count as guest.
/// They are found by inode: a jailed VMM names the file by its jail path.
pub fn pss(pid: u32, guest_memory_file: &Path) -> Option<Pss> {
    use std::os::unix::fs::MetadataExt;
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let guest_inode = std::fs::metadata(guest_memory_file).ok()?.ino().to_string();
    let mut pss = Pss::default();
    let mut in_guest = false;
    for line in text.lines() {
        if let Some(kb) = line.strip_prefix("Pss:") {
            let bytes = kb
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()?
                * 1024;
            pss.total += bytes;
            if in_guest {
                pss.guest += bytes;
            }
        } else if is_mapping_header(line) {
            // address perms offset dev inode path
            in_guest = line.split_whitespace().nth(4) == Some(guest_inode.as_str());
        }
    }
    Some(pss)
}

/// Header lines look like `7f..-7f.. rw-p 00000000 fd:01 1234   /path`.
fn is_mapping_header(line: &str) -> bool {
    line.split_whitespace().next().is_some_and(|range| {
        range.contains('-') && range.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
    })
}

/// User plus system CPU time of a process (all its threads).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at state.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|t| *t > 0)?;
    Some(Duration::from_micros((utime + stime) * 1_000_000 / ticks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let exe = std::env::current_exe().unwrap();
        let pss = pss(me, &exe).expect("smaps readable");
        assert!(
            pss.total > 0 && pss.guest > 0 && pss.guest < pss.total,
            "{pss:?}"
        );
        // Burn CPU (opaque to the optimiser) until the counter, in clock
        // ticks, moves; a minute without that would be a broken reader.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while cpu_time(me).expect("stat readable") == Duration::ZERO {
            for i in 0..1_000_000u64 {
                x = std::hint::black_box(x.wrapping_add(i * i));
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no CPU time counted"
            );
        }
        assert!(is_mapping_header("7f00-7f10 rw-p 00000000 00:00 0"));
        assert!(!is_mapping_header("Pss:                 4 kB"));
    }
}
