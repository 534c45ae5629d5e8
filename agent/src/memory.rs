//! Keeping the resident set small on a Pi.
//!
//! Most of the agent's resident memory is code: the kernel maps the binary's pages in
//! 64 KiB runs around each page touched ("fault-around"), and start-up (argument and
//! configuration parsing, schema setup, TLS set-up) touches code that the steady loop
//! never runs again. Once started, the agent asks the kernel to drop its clean
//! file-backed pages (they are re-read from the page cache on demand, not from the SD
//! card) and to fault them back one page at a time (`MADV_RANDOM`), so the resident set
//! holds what the loop uses.

/// Drops this process's clean file-backed pages; returns how many mappings it advised.
pub fn trim_code_pages() -> usize {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return 0;
    };
    let mut advised = 0;
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        let path = parts.nth(3);
        let file_backed = path.is_some_and(|p| p.starts_with('/'));
        if !file_backed || perms.contains('w') || !perms.ends_with('p') {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        let addr = start as *mut std::ffi::c_void;
        // SAFETY: the range is a mapping of this process as the kernel lists it;
        // both advices only change how its clean, read-only pages are kept in memory.
        unsafe {
            let _ = rustix::mm::madvise(addr, end - start, rustix::mm::Advice::Random);
            let _ = rustix::mm::madvise(addr, end - start, rustix::mm::Advice::LinuxPageOut);
        }
        advised += 1;
    }
    advised
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_file_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssFile:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("RssFile in /proc/self/status")
    }

    #[test]
    fn trimming_gives_back_file_backed_pages() {
        let before = rss_file_kib();
        assert!(trim_code_pages() > 0, "the binary itself is a file mapping");
        let after = rss_file_kib();
        assert!(
            after < before,
            "resident file pages {before} KiB before, {after} KiB after"
        );
    }
}
