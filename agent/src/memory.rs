//! Keeping the resident set small on a Pi.
//!
//! Most of the agent's resident memory is code: the kernel maps the binary's pages in
//! 64 KiB runs around each page touched ("fault-around"), and start-up (argument and
//! configuration parsing, schema setup, TLS set-up) touches code that the steady loop
//! never runs again. Once started, the agent asks the kernel to drop its clean
//! file-backed pages (they are re-read from the page cache on demand, not from the SD
//! card) and to fault them back one page at a time (`MADV_RANDOM`), so the resident set
//! holds what the loop uses.
//!
//! The heap is the other part. glibc's allocator gives each thread that allocates its
//! own arena (up to eight per core on a 64-bit system, two on a 32-bit one, each keeping
//! what it once held), raises its trim threshold after a large block is freed, and
//! gives freed memory back only from the top of an arena. The agent has few threads
//! (the runtime's, the spool writer, a blocking pool for reads of the spool), so
//! [`tune_allocator`] keeps them to [`ARENAS`] arenas with fixed thresholds, and an
//! uploader calls [`after_delivery`], which gives free pages back to the system
//! (`malloc_trim`) after a part of at least [`TRIM_AFTER_ROWS`] rows. Other C libraries
//! (musl) have none of these settings: there the functions do nothing.

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

/// Arenas glibc's allocator may make: threads share them beyond this count.
pub const ARENAS: i32 = 2;

/// Freed memory at the top of the heap beyond which glibc gives it back at once (and
/// blocks at least this large are mapped on their own, and unmapped when freed).
pub const TRIM_THRESHOLD_BYTES: i32 = 256 * 1024;

/// Rows of a delivered part from which [`after_delivery`] gives free memory back.
pub const TRIM_AFTER_ROWS: usize = 1_000;

/// How many times [`after_delivery`] has given memory back in this process.
static TRIMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Sets the allocator up for a small, long-running process; call before any thread
/// but the main one starts. Returns whether the C library took the settings.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's parameters; called before other
        // threads exist, as glibc asks for M_ARENA_MAX.
        unsafe {
            let arenas = libc::mallopt(libc::M_ARENA_MAX, ARENAS);
            // Fixed values also turn off glibc's raising of both thresholds each time a
            // large mapped block is freed (up to 32 MiB, then 64 MiB kept unreturned).
            let trim = libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES);
            let mmap = libc::mallopt(libc::M_MMAP_THRESHOLD, TRIM_THRESHOLD_BYTES);
            arenas == 1 && trim == 1 && mmap == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Gives the allocator's free pages back to the system (from every arena, not just
/// the top of each); returns whether any were released.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only returns free memory of the allocator to the kernel.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Called by an uploader once a part of `rows` rows is delivered: after a large one
/// (at least [`TRIM_AFTER_ROWS`]), whose rows, encoding and buffers were just freed,
/// gives the free memory back ([`release_free_memory`]) and counts it ([`trims`]).
/// Returns whether it did.
pub fn after_delivery(rows: usize) -> bool {
    if rows < TRIM_AFTER_ROWS {
        return false;
    }
    release_free_memory();
    TRIMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    true
}

/// How many times [`after_delivery`] gave memory back in this process.
pub fn trims() -> u64 {
    TRIMS.load(std::sync::atomic::Ordering::Relaxed)
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

    fn rss_anon_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("RssAnon in /proc/self/status")
    }

    #[test]
    fn a_small_delivery_leaves_the_allocator_alone_and_a_large_one_trims() {
        let before = trims();
        assert!(!after_delivery(TRIM_AFTER_ROWS - 1));
        // Other tests may deliver at the same time: this one's trims are at least its own.
        assert!(after_delivery(TRIM_AFTER_ROWS));
        assert!(trims() > before, "a trim after a large delivery is counted");
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_small_blocks_go_back_to_the_system_once_released() {
        // Many small blocks (below the mapping threshold, so from an arena), all but
        // the last freed: glibc keeps the pages below the last one until told.
        let blocks: Vec<Vec<u8>> = (0..40_000).map(|i| vec![i as u8; 1000]).collect();
        let mut blocks = blocks;
        let last = blocks.pop();
        let held = rss_anon_kib();
        drop(blocks);
        release_free_memory();
        let after = rss_anon_kib();
        drop(last);
        assert!(
            after + 20_000 < held,
            "RssAnon {held} KiB with 40 MB of blocks, {after} KiB once they were freed and released"
        );
    }
}
