//! A per-call arena: what one plugin call allocates is bumped out of a few
//! reused blocks and let go of all at once when the next call begins.
//!
//! A call builds and drops thousands of small strings, maps and vectors
//! (the event's members, the profile, the body, the output); in the
//! component, the general allocator's bookkeeping for them was a fifth of a
//! small event's time (BENCHMARKS.md §1). Here allocating is a pointer bump
//! and freeing does nothing, except that the newest allocation can give its
//! room back or grow in place (a string being written).
//!
//! What must outlive the call is allocated by the general allocator behind
//! the arena: anything large, anything allocated while no call is running
//! (the host's arguments, written into memory before the call), and
//! whatever a [`persistent`] scope allocates (the caches kept between
//! calls: parsed settings, phone numbers, libphonenumber's own state).
//! Freeing goes by address, so memory from either side may be freed
//! anywhere. A call's results (its returned strings and lists) stay valid
//! until the next call: the host reads them, and frees them (a no-op),
//! before it can call again.
//!
//! The one rule for code in this crate: memory that outlives a call must be
//! allocated in a [`persistent`] scope. The `arena` integration test maps
//! Chord's samples and a generated mix with the arena installed and every
//! block overwritten at each reset, and compares against the same events
//! mapped without it, so an allocation that breaks the rule is found.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::AtomicBool;

/// Allocations larger than this go to the general allocator even during a
/// call: a large event's text and body are freed as soon as they are done
/// with, instead of holding arena room until the next call.
const LARGEST: usize = 16 * 1024;
/// The first block; each further one is twice the last, up to `BLOCK_MAX`.
const BLOCK_FIRST: usize = 64 * 1024;
const BLOCK_MAX: usize = 4 * 1024 * 1024;
/// At most this many blocks (64 KiB to 4 MiB, then 4 MiB each: 32.9 MiB in
/// all); a call that needs more allocates the rest generally.
const BLOCKS: usize = 12;

thread_local! {
    /// Whether this thread's allocations go to the arena now: only during a
    /// call, and not in a [`persistent`] scope. Per thread, so that natively
    /// (tests) another thread's allocations never land in a call's arena;
    /// the component has one thread, where this is a plain static.
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with its allocations made by the general allocator, so that
/// they may outlive the call: caches kept between calls. Outside a call,
/// or when the arena is not installed (native builds), it changes nothing.
pub fn persistent<R>(f: impl FnOnce() -> R) -> R {
    let was = ACTIVE.replace(false);
    let result = f();
    ACTIVE.set(was);
    result
}

/// The arena in front of a general allocator `A`.
pub struct Arena<A> {
    general: A,
    /// Taken by every operation where there can be threads (natively, in
    /// tests); the component has one thread and takes none.
    #[cfg_attr(all(target_family = "wasm", not(target_feature = "atomics")), allow(dead_code))]
    lock: AtomicBool,
    state: UnsafeCell<State>,
    /// Tests: count what is handed out and given back, refuse to reset
    /// while anything is still out, and overwrite every block at a reset.
    poison: bool,
}

// SAFETY: `state` is only touched with `lock` held, or where there is one
// thread.
unsafe impl<A: Sync> Sync for Arena<A> {}

#[derive(Clone, Copy)]
struct Block {
    start: usize,
    end: usize,
}

struct State {
    blocks: [Block; BLOCKS],
    /// How many of `blocks` exist.
    count: usize,
    /// The block being bumped, and the next free byte in it.
    current: usize,
    next: usize,
    /// Where the newest allocation starts (it may shrink, grow or be given
    /// back in place).
    newest: usize,
    /// Allocations handed out and not given back (counted when poisoned).
    live: usize,
}

impl<A: GlobalAlloc> Arena<A> {
    pub const fn new(general: A) -> Arena<A> {
        Arena {
            general,
            lock: AtomicBool::new(false),
            state: UnsafeCell::new(State {
                blocks: [Block { start: 0, end: 0 }; BLOCKS],
                count: 0,
                current: 0,
                next: 0,
                newest: usize::MAX,
                live: 0,
            }),
            poison: false,
        }
    }

    /// An arena for tests: a call that begins while an allocation of an
    /// earlier one is still in use panics, naming how many; and the blocks
    /// are overwritten at each reset, so that a use after the call shows.
    pub const fn poisoned(general: A) -> Arena<A> {
        let mut arena = Arena::new(general);
        arena.poison = true;
        arena
    }

    /// Runs one plugin call: lets go of everything the previous call
    /// allocated here, then allocates in the arena until `f` returns.
    ///
    /// Nothing the previous call allocated in the arena may still be in use:
    /// the host has read the previous results before calling again, and
    /// code that keeps memory between calls allocates it in a
    /// [`persistent`] scope.
    pub fn call<R>(&self, f: impl FnOnce() -> R) -> R {
        let outlived = self.with(|state| state.live);
        // Outside the lock: the panic's message is allocated.
        assert!(
            outlived == 0,
            "{outlived} allocation(s) of the arena outlived their call: memory kept between calls must be allocated in `arena::persistent`"
        );
        self.with(|state| {
            if self.poison {
                for block in &state.blocks[..state.count] {
                    // SAFETY: the block is ours, and nothing in it is in use
                    // (the contract above).
                    unsafe { std::ptr::write_bytes(block.start as *mut u8, 0xA5, block.end - block.start) };
                }
            }
            state.current = 0;
            state.next = state.blocks[0].start;
            state.newest = usize::MAX;
        });
        ACTIVE.set(true);
        let result = f();
        ACTIVE.set(false);
        result
    }

    /// How many blocks the arena holds (they are never given back).
    pub fn blocks(&self) -> usize {
        self.with(|state| state.count)
    }

    #[inline]
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        // WebAssembly without the threads proposal has one thread: no lock.
        #[cfg(not(all(target_family = "wasm", not(target_feature = "atomics"))))]
        while self
            .lock
            .compare_exchange_weak(
                false,
                true,
                std::sync::atomic::Ordering::Acquire,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_err()
        {
            std::hint::spin_loop();
        }
        // SAFETY: the lock is held (or there is one thread), so this is the
        // only reference.
        let result = f(unsafe { &mut *self.state.get() });
        #[cfg(not(all(target_family = "wasm", not(target_feature = "atomics"))))]
        self.lock.store(false, std::sync::atomic::Ordering::Release);
        result
    }

    /// Room for `layout` in the arena, or null when it must go elsewhere.
    fn bump(&self, state: &mut State, layout: Layout) -> *mut u8 {
        loop {
            if state.count > 0 {
                let block = state.blocks[state.current];
                let start = state.next.next_multiple_of(layout.align());
                if let Some(end) = start.checked_add(layout.size())
                    && end <= block.end
                {
                    state.next = end;
                    state.newest = start;
                    if self.poison {
                        state.live += 1;
                    }
                    return start as *mut u8;
                }
                if state.current + 1 < state.count {
                    state.current += 1;
                    state.next = state.blocks[state.current].start;
                    state.newest = usize::MAX;
                    continue;
                }
            }
            if state.count == BLOCKS {
                return std::ptr::null_mut();
            }
            let size = match state.count {
                0 => BLOCK_FIRST,
                n => (2 * (state.blocks[n - 1].end - state.blocks[n - 1].start)).min(BLOCK_MAX),
            };
            // SAFETY: a non-zero size and a valid alignment.
            let start = unsafe { self.general.alloc(Layout::from_size_align_unchecked(size, 16)) } as usize;
            if start == 0 {
                return std::ptr::null_mut();
            }
            state.blocks[state.count] = Block {
                start,
                end: start + size,
            };
            state.count += 1;
            state.current = state.count - 1;
            state.next = start;
            state.newest = usize::MAX;
        }
    }
}

impl State {
    fn owns(&self, address: usize) -> bool {
        self.blocks[..self.count]
            .iter()
            .any(|block| block.start <= address && address < block.end)
    }
}

// SAFETY: arena memory comes from blocks the general allocator gave and
// that are never freed, handed out once per call without overlap; all
// other memory is the general allocator's, freed by it (told apart by
// address).
unsafe impl<A: GlobalAlloc> GlobalAlloc for Arena<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() <= LARGEST && ACTIVE.get() {
            let room = self.with(|state| self.bump(state, layout));
            if !room.is_null() {
                return room;
            }
        }
        // SAFETY: the caller's layout, as given.
        unsafe { self.general.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let address = ptr as usize;
        let ours = self.with(|state| {
            if !state.owns(address) {
                return false;
            }
            if self.poison {
                state.live = state.live.saturating_sub(1);
            }
            // The newest allocation gives its room back.
            if address == state.newest && address + layout.size() == state.next {
                state.next = address;
                state.newest = usize::MAX;
            }
            true
        });
        if !ours {
            // SAFETY: the general allocator's memory, as the caller says.
            unsafe { self.general.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let address = ptr as usize;
        let in_place = self.with(|state| {
            if !state.owns(address) {
                return None;
            }
            // The newest allocation grows or shrinks where it is, while
            // its block has room and it is not large (then it moves to the
            // general allocator, to be freed when done with).
            let block = state.blocks[state.current];
            if address == state.newest
                && address + layout.size() == state.next
                && new_size <= LARGEST
                && new_size <= block.end - address
            {
                state.next = address + new_size;
                return Some(true);
            }
            Some(false)
        });
        match in_place {
            // SAFETY: the general allocator's memory, as the caller says.
            None => unsafe { self.general.realloc(ptr, layout, new_size) },
            Some(true) => ptr,
            Some(false) => {
                if self.poison {
                    // The old room is left behind, given back.
                    self.with(|state| state.live = state.live.saturating_sub(1));
                }
                // SAFETY: the caller's alignment with a size it vouches for.
                let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
                // SAFETY: as `GlobalAlloc::realloc` does by default.
                let moved = unsafe { self.alloc(new_layout) };
                if !moved.is_null() {
                    // SAFETY: both hold at least the smaller size, and do not
                    // overlap (`moved` is new).
                    unsafe { std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size)) };
                }
                moved
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::System;

    use super::*;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 8).unwrap()
    }

    // One test, so that the process-wide flag is not shared with another
    // test running at the same time.
    #[test]
    fn calls_bump_reset_and_leave_persistent_memory_alone() {
        let arena = Arena::poisoned(System);
        let (a, b, kept, large) = arena.call(|| unsafe {
            let a = arena.alloc(layout(24));
            let b = arena.alloc(layout(40));
            // Bumped, in order, 8-aligned.
            assert_eq!(b as usize, a as usize + 24);
            let kept = persistent(|| arena.alloc(layout(32)));
            let large = arena.alloc(layout(LARGEST + 1));
            arena.state_owns(a, b, kept, large);
            (a, b, kept, large)
        });
        unsafe {
            kept.write_bytes(7, 32);
            // The newest allocation grows in place; an older one moves.
            let b2 = arena.realloc(b, layout(40), 80);
            assert_eq!(b2, b);
            let a2 = arena.realloc(a, layout(24), 48);
            assert_ne!(a2, a);
            // Freeing arena memory is a no-op; general memory is freed.
            arena.dealloc(a2, layout(48));
            arena.dealloc(large, layout(LARGEST + 1));
        }
        // `b` is still out: the next call refuses to begin.
        let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| arena.call(|| ())));
        assert!(refused.is_err(), "an allocation outlived its call");
        unsafe { arena.dealloc(b, layout(80)) };
        // The next call starts at the beginning again, and the persistent
        // allocation is untouched by the poisoning.
        let again = arena.call(|| unsafe { arena.alloc(layout(128)) });
        assert_eq!(again, a);
        assert!(
            unsafe { std::slice::from_raw_parts(kept, 32) }
                .iter()
                .all(|&byte| byte == 7)
        );
        assert_eq!(unsafe { *again.add(100) }, 0xA5, "the block was poisoned");
        unsafe { arena.dealloc(again, layout(128)) };
        unsafe { arena.dealloc(kept, layout(32)) };
        // A call that outgrows the first block takes another.
        arena.call(|| unsafe {
            let mut all = Vec::new();
            for _ in 0..(BLOCK_FIRST / 4096 + 2) {
                let room = persistent(|| arena.alloc(layout(4096)));
                assert!(!room.is_null());
                all.push(room);
            }
            let last = all.last().copied().unwrap();
            arena.with(|state| {
                assert_eq!(state.count, 1, "persistent allocations are general");
                assert!(!state.owns(last as usize));
            });
            for room in all {
                arena.dealloc(room, layout(4096));
            }
            let mut all = Vec::with_capacity(32);
            for _ in 0..(BLOCK_FIRST / 4096 + 2) {
                all.push(arena.alloc(layout(4096)));
            }
            arena.with(|state| {
                assert_eq!(state.count, 2);
                assert!(all.iter().all(|&room| state.owns(room as usize)));
            });
            for room in all {
                arena.dealloc(room, layout(4096));
            }
        });
        // Outside a call, allocations are general.
        let outside = unsafe { arena.alloc(layout(8)) };
        assert!(!arena.with(|state| state.owns(outside as usize)));
        unsafe { arena.dealloc(outside, layout(8)) };
    }

    impl<A: GlobalAlloc> Arena<A> {
        fn state_owns(&self, a: *mut u8, b: *mut u8, kept: *mut u8, large: *mut u8) {
            self.with(|state| {
                assert!(state.owns(a as usize) && state.owns(b as usize));
                assert!(!state.owns(kept as usize), "a persistent allocation is general");
                assert!(!state.owns(large as usize), "a large allocation is general");
            });
        }
    }
}
