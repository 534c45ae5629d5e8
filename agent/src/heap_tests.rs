//! (tests only) The bytes this thread holds on the heap, to test how much a structure
//! takes: the test binary's allocator counts what each thread allocates and frees.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    static HELD: Cell<isize> = const { Cell::new(0) };
    /// The most `HELD` has been since [`peak_of`] last started.
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(bytes: isize) {
    // A thread being torn down has no counter left: nothing is counted then.
    let _ = HELD.try_with(|held| {
        held.set(held.get() + bytes);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(held.get())));
    });
}

struct Counting;

// SAFETY: every call is passed on to the system allocator as it came; only a
// thread-local counter is added, which allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            count(layout.size() as isize);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            count(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let moved = unsafe { System.realloc(ptr, layout, new_size) };
        if !moved.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        moved
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// What `make` returns and the bytes this thread holds more after it (what it made
/// holds, less what it freed of what was there before).
pub fn held_by<T>(make: impl FnOnce() -> T) -> (T, isize) {
    let before = HELD.with(Cell::get);
    let made = make();
    (made, HELD.with(Cell::get) - before)
}

/// What `make` returns and the most bytes this thread held beyond what it held before,
/// at any moment while `make` ran. (Only the Parquet encoder's tests use it so far.)
#[cfg(feature = "parquet")]
pub fn peak_of<T>(make: impl FnOnce() -> T) -> (T, isize) {
    let before = HELD.with(Cell::get);
    PEAK.with(|peak| peak.set(before));
    let made = make();
    (made, PEAK.with(Cell::get) - before)
}
