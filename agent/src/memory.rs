//! Keeping the resident set small on a Pi.
//!
//! Much of the agent's resident memory is code: the kernel maps the binary's pages in
//! 64 KiB runs around each page touched ("fault-around"), and start-up (argument and
//! configuration parsing, schema setup, TLS set-up) touches code that the steady loop
//! never runs again. Once started, and shortly after each commit of the spool (the end
//! of a flush, after which a delivery may follow; see [`trim_after_commits`]), the agent
//! unmaps the pages of its clean, read-only, private file mappings from its own page
//! tables (`MADV_DONTNEED`). They stay in the page cache, so a page the loop needs again is
//! mapped back from memory, not read from the SD card. (`MADV_PAGEOUT`, used before,
//! reclaimed them from the page cache as well, and start-up's pages came back from the
//! card.)
//!
//! Design: `MADV_DONTNEED` on a private mapping also throws away the private copies
//! of its pages; on a read-only mapping those are the relocations the dynamic linker
//! wrote before making it read-only (RELRO). So a mapping is advised only when
//! `/proc/self/smaps` counts no private copy in it (`Anonymous:` and `Swap:` both 0: a
//! page copied on write is an anonymous page); the others are left alone. Not
//! `Private_Dirty:`, which also counts a file's pages that are dirty in the page cache,
//! mapped by this process alone: a binary installed or copied less than half a minute
//! before the agent started (its writeback not yet done), whose code would otherwise
//! stay resident for the agent's life.
//! `MADV_RANDOM` besides: a page the kernel did drop from the cache under memory
//! pressure is read back alone, without read-ahead.
//!
//! The heap is the other part. glibc's allocator gives each thread that allocates its
//! own arena (up to eight per core on a 64-bit system, two on a 32-bit one, each keeping
//! what it once held), raises its trim threshold after a large block is freed, and
//! gives freed memory back only from the top of an arena. The agent has few threads
//! (the runtime's, the spool writer, a blocking pool for reads of the spool), so
//! [`tune_allocator`] keeps them to [`ARENAS`] arenas with fixed thresholds, and an
//! uploader calls [`after_delivery`] once its sink has nothing left to send (a part,
//! or a whole backlog, delivered), which gives free pages back to the system
//! (`malloc_trim`) when at least [`TRIM_AFTER_ROWS`] rows went since the last call; the
//! agent's trim after each commit does it too, for what the flush freed (at 100 series
//! a walk of a heap of about a megabyte). A sink encoding a delivery calls
//! [`after_chunk`] after each chunk: there only chunks whose windows hold many series.
//! Other C libraries (musl) have none of these settings: there the functions do nothing.

/// When the agent first trims, after start-up.
pub const TRIM_FIRST: std::time::Duration = std::time::Duration::from_secs(3);

/// How long after a spool commit (or a delivery recorded) the agent trims. Design: a
/// commit ends a flush (the windows encoded and written), a delivery recorded ends an
/// upload; trimming once that work is done, rather than at a fixed minute, leaves the
/// loop's pages mapped and the flush's unmapped whatever the phase.
pub const TRIM_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// The longest the agent goes without trimming (when no commit comes), and twice the
/// shortest time between two trims. Design: code that ran since (a delivery, a
/// reconnection) leaves its pages mapped, in 64 KiB runs, until the next trim; each trim
/// costs a read of `/proc/self/maps` (and of `/proc/self/smaps` when the mappings
/// changed, see [`CodeTrimmer`]) and the loop's pages come back as minor faults, from
/// memory. With short windows (a commit every few seconds) the floor of half of it keeps
/// that cost bounded.
pub const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Calls `trim` [`TRIM_FIRST`] after it starts, then [`TRIM_SETTLE`] after the first
/// change of `commits` since the last trim (the spool's count of commits and deliveries
/// recorded, [`crate::spool::SpoolHandle::work`]), but not sooner than half of
/// [`TRIM_EVERY`] after the last trim (start-up's aside), and [`TRIM_EVERY`] after the
/// last trim when no commit came (or the count's sender is gone). Commits while a trim
/// is due do not move it. Runs until dropped.
pub async fn trim_after_commits(
    mut commits: tokio::sync::watch::Receiver<u64>,
    mut trim: impl FnMut(),
) {
    use tokio::time::{Instant, sleep, sleep_until};
    sleep(TRIM_FIRST).await;
    commits.mark_unchanged();
    trim();
    let mut last = Instant::now();
    // Design: start-up's trim sets no floor; the first flush may come any time after it.
    let mut floor = last;
    // When the next trim is due, once a commit came since the last one.
    let mut due: Option<Instant> = None;
    let mut open = true;
    loop {
        let at = due.unwrap_or(last + TRIM_EVERY);
        tokio::select! {
            changed = commits.changed(), if open && due.is_none() => match changed {
                Ok(()) => due = Some((Instant::now() + TRIM_SETTLE).max(floor)),
                Err(_) => open = false,
            },
            () = sleep_until(at) => {
                commits.mark_unchanged();
                trim();
                last = Instant::now();
                floor = last + TRIM_EVERY / 2;
                due = None;
            }
        }
    }
}

/// The lines of `/proc/self/maps` that may name a trimmable mapping: file-backed,
/// read-only, private. What the last smaps read found stays true while these are the
/// same lines.
fn candidate_lines(maps: &str) -> String {
    let mut lines = String::new();
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(_range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        let file_backed = parts.nth(3).is_some_and(|p| p.starts_with('/'));
        if file_backed && !perms.contains('w') && perms.ends_with('p') {
            lines.push_str(line);
            lines.push('\n');
        }
    }
    lines
}

/// One mapping of `/proc/self/smaps` as read so far.
struct SmapsEntry {
    start: usize,
    end: usize,
    /// File-backed, read-only, private, and listed in maps.
    candidate: bool,
    /// Whether its `Anonymous:` field was read.
    counted: bool,
    /// `Anonymous:` and `Swap:` KiB together: its private copies.
    private_kib: u64,
}

/// The mappings of `/proc/self/smaps` that may be trimmed: their ranges.
fn trimmable(smaps: &str, maps: &str) -> Vec<(usize, usize)> {
    // Design: only ranges that /proc/self/maps lists too. Under an emulator (qemu-user)
    // smaps can be the emulator's own (host addresses, not the guest's) or a stand-in
    // with every count 0; advising what it names would drop pages the program wrote,
    // RELRO's among them. A real kernel lists the same ranges in both, and some of them
    // (the code running now, the stack) with resident pages: a smaps with nothing
    // resident anywhere is a stand-in, and nothing it names is advised. A range with
    // nothing resident at the read is still advised: its pages may be mapped by the
    // time of a later trim, which advises what this read found.
    let listed: std::collections::HashSet<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let mut found = Vec::new();
    let mut any_resident = false;
    let mut current: Option<SmapsEntry> = None;
    let kib = |value: &str| {
        value
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()
    };
    let finish = |entry: Option<SmapsEntry>, found: &mut Vec<(usize, usize)>| {
        if let Some(e) = entry
            && e.candidate
            && e.counted
            && e.private_kib == 0
        {
            found.push((e.start, e.end));
        }
    };
    for line in smaps.lines() {
        if let Some((key, value)) = line.split_once(':')
            && !key.contains(' ')
        {
            // A field line: "Rss:   12 kB". An unreadable count of private pages
            // counts as some.
            let Some(entry) = current.as_mut() else {
                continue;
            };
            match key {
                "Rss" => any_resident |= kib(value).is_some_and(|v| v > 0),
                "Anonymous" | "Swap" => {
                    entry.private_kib += kib(value).unwrap_or(1);
                    entry.counted |= key == "Anonymous";
                }
                _ => {}
            }
            continue;
        }
        // A mapping's header: start-end perms offset dev inode [path].
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        let path = parts.nth(3);
        let file_backed = path.is_some_and(|p| p.starts_with('/'));
        let candidate =
            file_backed && !perms.contains('w') && perms.ends_with('p') && listed.contains(range);
        finish(
            current.replace(SmapsEntry {
                start,
                end,
                candidate,
                counted: false,
                private_kib: 0,
            }),
            &mut found,
        );
    }
    finish(current, &mut found);
    if !any_resident {
        found.clear();
    }
    found
}

/// Trims this process's code pages again and again, reading `/proc/self/smaps` only
/// when the mappings changed.
///
/// Design: smaps costs the kernel a walk of every page table of the process (about ten
/// times a read of maps) and the agent a parse of some 40 kB; what it tells (which
/// read-only private file mappings hold no private copy) changes only when those
/// mappings do. A private copy is made by a write, so only while a mapping is writable:
/// made read-only again (RELRO, by the dynamic linker) it is a new line of maps, as a
/// mapping loaded later (`dlopen`) or made anew is. So each trim reads maps, and smaps
/// only when maps' read-only private file lines differ from those of the last smaps
/// read; otherwise it advises the ranges that read found, those with nothing resident at
/// that read among them (a page touched since is mapped again). What this does not see is a
/// mapping made writable, written and made read-only again between two trims (the same
/// line before and after): nothing in the agent changes a file mapping's protection
/// after start-up, and the dynamic linker's RELRO is done before the first trim.
#[derive(Debug, Default)]
pub struct CodeTrimmer {
    /// The candidate lines of maps when smaps was last read, and the ranges it gave.
    known: Option<(String, Vec<(usize, usize)>)>,
    smaps_reads: u64,
}

impl CodeTrimmer {
    /// Unmaps this process's clean, read-only, private file-backed pages (they stay in
    /// the page cache); returns how many mappings it advised.
    pub fn trim(&mut self) -> usize {
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
            return 0;
        };
        let mappings = self.ranges(&maps, || std::fs::read_to_string("/proc/self/smaps").ok());
        for &(start, end) in mappings {
            let addr = start as *mut std::ffi::c_void;
            // SAFETY: the range is a private, read-only file mapping of this process that
            // held no private (anonymous) page when smaps was read, and its line in maps
            // is unchanged since, so it was not made writable in between (see above):
            // dropping its pages loses nothing, the next access maps the file's page again.
            unsafe {
                let _ = rustix::mm::madvise(addr, end - start, rustix::mm::Advice::Random);
                let _ = rustix::mm::madvise(addr, end - start, rustix::mm::Advice::LinuxDontNeed);
            }
        }
        mappings.len()
    }

    /// The ranges to advise, given maps as read now: those found in the last smaps read
    /// while maps' candidate lines are the same, otherwise those of `smaps()` read now
    /// (none if it cannot be read).
    fn ranges(&mut self, maps: &str, smaps: impl FnOnce() -> Option<String>) -> &[(usize, usize)] {
        let lines = candidate_lines(maps);
        if self.known.as_ref().is_none_or(|(known, _)| *known != lines) {
            self.known = None;
            let Some(smaps) = smaps() else {
                return &[];
            };
            self.smaps_reads += 1;
            // Design: the lines of the maps read before smaps: a mapping made between
            // the two reads differs from them, and the next trim reads smaps again.
            let found = trimmable(&smaps, maps);
            self.known = Some((lines, found));
        }
        self.known
            .as_ref()
            .map_or(&[], |(_, found)| found.as_slice())
    }

    /// How many times it has read `/proc/self/smaps`.
    pub fn smaps_reads(&self) -> u64 {
        self.smaps_reads
    }
}

/// Trims once, reading smaps: [`CodeTrimmer::trim`] without what an earlier trim knew.
pub fn trim_code_pages() -> usize {
    CodeTrimmer::default().trim()
}

/// Arenas glibc's allocator may make: threads share them beyond this count.
pub const ARENAS: i32 = 2;

/// Freed memory at the top of the heap beyond which glibc gives it back at once (and
/// blocks at least this large are mapped on their own, and unmapped when freed).
pub const TRIM_THRESHOLD_BYTES: i32 = 256 * 1024;

/// Rows delivered since the last call from which [`after_delivery`] gives free memory back.
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

/// Called by an uploader once its sink has nothing left to send, with the rows it
/// delivered since the last call: after many (at least [`TRIM_AFTER_ROWS`]), whose
/// rows, encodings and buffers were freed,
/// gives the free memory back ([`release_free_memory`]) and counts it ([`trims`]).
/// Returns whether it did.
pub fn after_delivery(rows: usize) -> bool {
    release_counted(rows, &TRIMS)
}

/// From [`TRIM_AFTER_ROWS`] on, gives the free memory back and counts it in `trims`.
fn release_counted(rows: usize, trims: &std::sync::atomic::AtomicU64) -> bool {
    if rows < TRIM_AFTER_ROWS {
        return false;
    }
    release_free_memory();
    trims.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    true
}

/// How many times [`after_delivery`] gave memory back in this process.
pub fn trims() -> u64 {
    TRIMS.load(std::sync::atomic::Ordering::Relaxed)
}

/// How many times [`after_chunk`] has given memory back in this process.
static CHUNK_TRIMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Called by a sink once it encoded a chunk of a delivery and freed its rows, with the
/// most rows one window start of the chunk held: when a window holds at least [`TRIM_AFTER_ROWS`] series,
/// gives the free memory back ([`release_free_memory`]) and counts it ([`chunk_trims`]).
/// Returns whether it did.
///
/// Design: a chunk of many series is one or a few windows of every series; its rows, the
/// batch they were decoded from and the encoder's columns (a few MB at 10,000 series)
/// are freed on two threads, and what the next chunk does not take again stays
/// resident, so the peak of a drain is its largest chunk with the free memory of the
/// ones before. A chunk of few series (100 series: 100 windows of 100) is left alone,
/// as trimming after each part cost that drain about a seventh of its rate.
pub fn after_chunk(widest_window: usize) -> bool {
    release_counted(widest_window, &CHUNK_TRIMS)
}

/// How many times [`after_chunk`] gave memory back in this process.
pub fn chunk_trims() -> u64 {
    CHUNK_TRIMS.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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

    const PAGES: usize = 16;

    /// Held by the tests that map files, so that one's mapping does not appear in the
    /// middle of another's trims.
    static MAPPING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn mapping_lock() -> std::sync::MutexGuard<'static, ()> {
        MAPPING
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn page_size() -> usize {
        // SAFETY: sysconf reads a constant of the system.
        usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("a page size")
    }

    /// A temporary file of `PAGES` pages of `byte`, mapped private with `prot`.
    fn mapped(byte: u8, prot: libc::c_int) -> (tempfile::NamedTempFile, *mut u8, usize) {
        mapped_synced(byte, prot, true)
    }

    /// [`mapped`], its file synced first (`synced`) or its pages left dirty in the page
    /// cache.
    fn mapped_synced(
        byte: u8,
        prot: libc::c_int,
        synced: bool,
    ) -> (tempfile::NamedTempFile, *mut u8, usize) {
        let page = page_size();
        let len = PAGES * page;
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(&vec![byte; len]).expect("write");
        file.flush().expect("flush");
        // Clean pages, as a binary's are once written back: the kernel may evict those,
        // not dirty ones.
        if synced {
            file.as_file().sync_all().expect("sync");
        }
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh private mapping of a file this test owns.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE,
                file.as_file().as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap");
        (file, addr.cast(), len)
    }

    /// How many of the mapping's pages are in the page cache (mapped here or not).
    fn cached_pages(addr: *mut u8, len: usize) -> usize {
        let mut vec = vec![0u8; PAGES];
        // SAFETY: `addr..addr+len` is a mapping of this test, `vec` holds a byte per page.
        let rc = unsafe { libc::mincore(addr.cast(), len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore");
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    #[test]
    fn trimmed_code_stays_in_the_page_cache() {
        let _lock = mapping_lock();
        let (_file, addr, len) = mapped(7, libc::PROT_READ);
        let page = page_size();
        // SAFETY: reads inside the mapping.
        let sum: u64 = (0..PAGES)
            .map(|i| u64::from(unsafe { *addr.add(i * page) }))
            .sum();
        assert_eq!(sum, 7 * PAGES as u64);
        assert_eq!(cached_pages(addr, len), PAGES);
        trim_code_pages();
        // Evicting them (MADV_PAGEOUT) would make the next access read the disk.
        assert_eq!(
            cached_pages(addr, len),
            PAGES,
            "trimmed pages must stay in the page cache"
        );
        // SAFETY: unmapping what `mapped` mapped.
        unsafe { libc::munmap(addr.cast(), len) };
    }

    #[test]
    fn a_read_only_mapping_with_private_copies_keeps_them() {
        let _lock = mapping_lock();
        let mut trimmer = CodeTrimmer::default();
        trimmer.trim();
        // As RELRO: written after mapping (private copies), then made read-only, after a
        // trim that read smaps: the next trim must read it again and leave them.
        let (_file, addr, len) = mapped(1, libc::PROT_READ | libc::PROT_WRITE);
        let page = page_size();
        // SAFETY: writes inside the mapping, then makes it read-only.
        unsafe {
            for i in 0..PAGES {
                *addr.add(i * page) = 2;
            }
            assert_eq!(libc::mprotect(addr.cast(), len, libc::PROT_READ), 0);
        }
        trimmer.trim();
        // SAFETY: reads inside the mapping.
        let kept = (0..PAGES).all(|i| unsafe { *addr.add(i * page) } == 2);
        assert!(kept, "the private copies were thrown away");
        // SAFETY: unmapping what `mapped` mapped.
        unsafe { libc::munmap(addr.cast(), len) };
    }

    #[test]
    fn smaps_mappings_qualify_only_when_read_only_private_files_without_copies() {
        let smaps = "\
55d0a0000000-55d0a0010000 r--p 00000000 08:01 123 /usr/bin/edgespool
Rss:                  64 kB
Anonymous:             0 kB
55d0a0010000-55d0a0020000 r--p 00010000 08:01 123 /usr/bin/edgespool
Rss:                  64 kB
Anonymous:             4 kB
55d0a0020000-55d0a0030000 rw-p 00020000 08:01 123 /usr/bin/edgespool
Rss:                  64 kB
Anonymous:             0 kB
55d0a0030000-55d0a0040000 r--s 00000000 08:01 124 /var/lib/x.shm
Rss:                  64 kB
Anonymous:             0 kB
55d0a0040000-55d0a0050000 r--p 00000000 00:00 0
Rss:                  64 kB
Anonymous:             0 kB
55d0a0050000-55d0a0060000 r-xp 00000000 08:01 125 /usr/lib/libc.so.6
Rss:                  16 kB
Anonymous:             0 kB
55d0a0060000-55d0a0070000 r-xp 00010000 08:01 125 /usr/lib/libc.so.6
Rss:                   0 kB
Anonymous:             0 kB
55d0a0070000-55d0a0080000 r-xp 00020000 08:01 125 /usr/lib/libc.so.6
Rss:                  16 kB
Anonymous:             0 kB
55d0a0080000-55d0a0088000 r--p 00030000 08:01 125 /usr/lib/libc.so.6
Rss:                  16 kB
Private_Dirty:         4 kB
Anonymous:             4 kB
55d0a0088000-55d0a0090000 r--p 00038000 08:01 125 /usr/lib/libc.so.6
Rss:                  16 kB
Private_Dirty:        16 kB
Anonymous:             0 kB
55d0a0090000-55d0a00a0000 r--p 00040000 08:01 125 /usr/lib/libc.so.6
Rss:                   0 kB
Anonymous:             0 kB
Swap:                  8 kB
55d0a00a0000-55d0a00b0000 r--p 00050000 08:01 125 /usr/lib/libc.so.6
Rss:                   4 kB
";
        // maps as the kernel gives it lists every range of smaps; the last one is left
        // out, as when smaps is not this program's own (an emulator's).
        let maps: String = smaps
            .lines()
            .filter(|l| l.contains(" /") || l.ends_with(" 0"))
            .filter(|l| !l.starts_with("55d0a0070000"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            trimmable(smaps, &maps),
            [
                (0x55d0a0000000, 0x55d0a0010000),
                (0x55d0a0050000, 0x55d0a0060000),
                (0x55d0a0060000, 0x55d0a0070000),
                (0x55d0a0088000, 0x55d0a0090000)
            ],
            "nothing resident is no reason to leave a range out, nor file pages dirty in \
             the page cache; a private copy (anonymous or swapped), no count of them, a \
             writable or shared mapping, an anonymous one, or a range maps does not list \
             are"
        );
    }

    #[test]
    fn a_smaps_with_nothing_resident_anywhere_names_nothing_to_trim() {
        // qemu-user's stand-in for a guest's smaps: the guest's ranges, every count 0
        // (RELRO's private copies among them, uncounted).
        let smaps = "\
55d0a0000000-55d0a0010000 r--p 00000000 08:01 123 /usr/bin/edgespool
Size:                 64 kB
Rss:                   0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
Swap:                  0 kB
55d0a0010000-55d0a0020000 r--p 00010000 08:01 123 /usr/bin/edgespool
Size:                 64 kB
Rss:                   0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
Swap:                  0 kB
";
        let maps: String = smaps
            .lines()
            .filter(|l| l.contains(" /"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(trimmable(smaps, &maps), []);
        let resident = smaps.replacen(
            "Rss:                   0 kB",
            "Rss:                   4 kB",
            1,
        );
        assert_eq!(
            trimmable(&resident, &maps).len(),
            2,
            "one resident range makes it credible"
        );
    }

    /// The resident KiB smaps gives the mapping that starts at `addr`.
    fn resident_kib(addr: *mut u8) -> u64 {
        smaps_kib(addr, "Rss:")
    }

    /// The KiB of field `name` (`"Rss:"`) smaps gives the mapping that starts at `addr`.
    fn smaps_kib(addr: *mut u8, name: &str) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let start = format!("{:x}-", addr as usize);
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        assert!(lines.next().is_some(), "smaps lists the mapping");
        lines
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("its {name}"))
    }

    #[test]
    fn a_mapping_made_after_a_trim_is_trimmed_by_the_next() {
        let _lock = mapping_lock();
        let mut trimmer = CodeTrimmer::default();
        assert!(trimmer.trim() > 0, "the binary itself is a file mapping");
        let (_file, addr, len) = mapped(3, libc::PROT_READ);
        let page = page_size();
        // SAFETY: reads inside the mapping.
        let sum: u64 = (0..PAGES)
            .map(|i| u64::from(unsafe { *addr.add(i * page) }))
            .sum();
        assert_eq!(sum, 3 * PAGES as u64);
        assert!(resident_kib(addr) > 0, "its pages were read");
        let reads = trimmer.smaps_reads();
        trimmer.trim();
        assert!(
            trimmer.smaps_reads() > reads,
            "a new mapping makes the trim read smaps again"
        );
        assert_eq!(
            resident_kib(addr),
            0,
            "the new mapping's pages are unmapped by the trim after it appeared"
        );
        // SAFETY: unmapping what `mapped` mapped.
        unsafe { libc::munmap(addr.cast(), len) };
    }

    #[test]
    fn a_mapping_untouched_when_smaps_was_read_is_trimmed_once_touched() {
        let _lock = mapping_lock();
        let (_file, addr, len) = mapped(5, libc::PROT_READ);
        let mut trimmer = CodeTrimmer::default();
        trimmer.trim();
        assert_eq!(resident_kib(addr), 0, "nothing of it was read yet");
        let reads = trimmer.smaps_reads();
        let page = page_size();
        // SAFETY: reads inside the mapping.
        let sum: u64 = (0..PAGES)
            .map(|i| u64::from(unsafe { *addr.add(i * page) }))
            .sum();
        assert_eq!(sum, 5 * PAGES as u64);
        assert!(resident_kib(addr) > 0, "its pages were read");
        trimmer.trim();
        assert_eq!(
            trimmer.smaps_reads(),
            reads,
            "the same mappings: smaps is not read again"
        );
        assert_eq!(
            resident_kib(addr),
            0,
            "the pages read since the last smaps read are unmapped by the next trim"
        );
        // SAFETY: unmapping what `mapped` mapped.
        unsafe { libc::munmap(addr.cast(), len) };
    }

    #[test]
    fn a_file_written_just_before_it_was_mapped_is_trimmed_though_its_pages_are_dirty() {
        use std::os::unix::fs::FileExt;
        let _lock = mapping_lock();
        let page = page_size();
        // Not synced: as a binary is for half a minute after it was installed.
        let (file, addr, len) = mapped_synced(3, libc::PROT_READ, false);
        // SAFETY: reads inside the mapping.
        let sum: u64 = (0..PAGES)
            .map(|i| u64::from(unsafe { *addr.add(i * page) }))
            .sum();
        assert_eq!(sum, 3 * PAGES as u64);
        // Its pages are dirty in the page cache until written back (a `sync` by another
        // program cleans them: then they are written again, a few times at most).
        for _ in 0..3 {
            if smaps_kib(addr, "Private_Dirty:") > 0 {
                break;
            }
            file.as_file()
                .write_all_at(&vec![3u8; len], 0)
                .expect("write again");
        }
        assert!(
            smaps_kib(addr, "Private_Dirty:") > 0,
            "the file's pages are dirty"
        );
        assert_eq!(
            smaps_kib(addr, "Anonymous:"),
            0,
            "but none is a private copy"
        );
        let mut trimmer = CodeTrimmer::default();
        trimmer.trim();
        assert_eq!(
            resident_kib(addr),
            0,
            "a mapping of dirty file pages without private copies is trimmed"
        );
        // SAFETY: unmapping what was mapped above.
        unsafe { libc::munmap(addr.cast(), len) };
    }

    /// The seconds after the start of a paused test at which `trim_after_commits` trims,
    /// up to `until`, with a commit at each of `commits` (seconds too).
    async fn trims_for(commits: &[u64], until: u64) -> Vec<u64> {
        use tokio::time::{Duration, Instant, sleep_until};
        let start = Instant::now();
        let (commit, count) = tokio::sync::watch::channel(0u64);
        let (trimmed, mut trims) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(trim_after_commits(count, move || {
            let _ = trimmed.send(start.elapsed());
        }));
        for &at in commits {
            sleep_until(start + Duration::from_secs(at)).await;
            commit.send_modify(|n| *n += 1);
        }
        drop(commit);
        sleep_until(start + Duration::from_secs(until)).await;
        task.abort();
        let mut seen = Vec::new();
        while let Ok(at) = trims.try_recv() {
            assert_eq!(
                at.subsec_nanos(),
                0,
                "trims fall on whole seconds here: {at:?}"
            );
            seen.push(at.as_secs());
        }
        seen
    }

    #[tokio::test(start_paused = true)]
    async fn code_is_trimmed_a_settle_after_each_commit() {
        assert_eq!(
            trims_for(&[10, 50, 100], 170).await,
            [3, 12, 52, 102, 162],
            "after start-up, a settle after each commit, then a minute after the last trim"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_commits_code_is_trimmed_every_minute() {
        assert_eq!(trims_for(&[], 200).await, [3, 63, 123, 183]);
    }

    #[tokio::test(start_paused = true)]
    async fn trims_are_half_a_minute_apart_at_least_and_a_commit_while_one_is_due_waits() {
        // 15: too soon after the trim at 12, so at 42. 70 and 71 (a flush, then another
        // within the settle): a settle after the first. 101 to 131 every 2 s (short
        // windows): a settle after 101, then half a minute later, and a minute after
        // that when the commits stop.
        let mut commits = vec![10, 15, 70, 71];
        commits.extend((101..=131).step_by(2));
        assert_eq!(
            trims_for(&commits, 200).await,
            [3, 12, 42, 72, 103, 133, 193]
        );
    }
    #[test]
    fn smaps_is_read_again_only_when_the_read_only_file_mappings_change() {
        let smaps = "\
55d0a0000000-55d0a0010000 r--p 00000000 08:01 123 /usr/bin/edgespool
Rss:                  64 kB
Anonymous:             0 kB
55d0a0010000-55d0a0020000 rw-p 00010000 08:01 123 /usr/bin/edgespool
Rss:                  64 kB
Anonymous:             4 kB
55d0a0020000-55d0a0040000 rw-p 00000000 00:00 0 [heap]
Rss:                 128 kB
Anonymous:           128 kB
";
        let maps = "\
55d0a0000000-55d0a0010000 r--p 00000000 08:01 123 /usr/bin/edgespool
55d0a0010000-55d0a0020000 rw-p 00010000 08:01 123 /usr/bin/edgespool
55d0a0020000-55d0a0040000 rw-p 00000000 00:00 0 [heap]
";
        let binary = [(0x55d0a0000000, 0x55d0a0010000)];
        let mut trimmer = CodeTrimmer::default();
        assert_eq!(
            trimmer.ranges(maps, || None),
            [],
            "smaps cannot be read: nothing"
        );
        assert_eq!(trimmer.smaps_reads(), 0);
        assert_eq!(trimmer.ranges(maps, || Some(smaps.to_owned())), binary);
        assert_eq!(trimmer.smaps_reads(), 1);
        // The heap grown, an anonymous mapping made, a writable file one: not candidates.
        let grown = maps.replace("55d0a0020000-55d0a0040000", "55d0a0020000-55d0a0080000")
            + "7f0000000000-7f0000100000 rw-p 00000000 00:00 0\n"
            + "7f0000100000-7f0000110000 rw-s 00000000 08:01 9 /var/lib/edgespool/spool.db-shm\n";
        let unread = || -> Option<String> { panic!("smaps read though no candidate changed") };
        assert_eq!(trimmer.ranges(&grown, unread), binary);
        assert_eq!(trimmer.smaps_reads(), 1);
        // The writable part made read-only (RELRO): a new candidate line, smaps again,
        // and its private copies keep it out.
        let relro = grown.replace(
            "55d0a0010000-55d0a0020000 rw-p",
            "55d0a0010000-55d0a0020000 r--p",
        );
        let relro_smaps = smaps.replace(
            "55d0a0010000-55d0a0020000 rw-p",
            "55d0a0010000-55d0a0020000 r--p",
        );
        assert_eq!(trimmer.ranges(&relro, || Some(relro_smaps.clone())), binary);
        assert_eq!(trimmer.smaps_reads(), 2);
        // A library mapped (dlopen): read again, and its range is trimmed from now on.
        let lib = "7f0000200000-7f0000210000 r-xp 00000000 08:01 77 /usr/lib/libnss_files.so.2";
        let loaded = format!("{relro}{lib}\n");
        let loaded_smaps = format!("{relro_smaps}{lib}\nRss: 8 kB\nAnonymous: 0 kB\n");
        let both = [
            (0x55d0a0000000, 0x55d0a0010000),
            (0x7f0000200000, 0x7f0000210000),
        ];
        assert_eq!(trimmer.ranges(&loaded, || Some(loaded_smaps.clone())), both);
        assert_eq!(trimmer.ranges(&loaded, unread), both);
        assert_eq!(trimmer.smaps_reads(), 3);
        // Unmapped again: read again.
        assert_eq!(trimmer.ranges(&relro, || Some(relro_smaps.clone())), binary);
        assert_eq!(trimmer.smaps_reads(), 4);
    }
}
