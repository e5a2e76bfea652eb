//! The extension's global allocator: the C library's `malloc` for every
//! request it aligns naturally (16 bytes), mimalloc for the over-aligned ones.
//!
//! Tokio allocates each connection's task and its I/O registration 128-byte
//! aligned (cache-line padding). glibc serves such a request by carving the
//! aligned block out of a larger chunk and freeing the unaligned head and the
//! tail: two small free chunks per allocation, left between long-lived ones.
//! With two such allocations per connection that was about 250 bytes of
//! resident heap per idle connection that held nothing (docs/benchmarks.md,
//! "Over-aligned allocations"). mimalloc keeps blocks of one size together,
//! so an aligned block costs its size. Everything else stays with `malloc`:
//! mimalloc for all allocations made the server larger under load.
//!
//! The split is by the layout's alignment, which `dealloc` and `realloc` get
//! back unchanged, so every block is freed by the allocator that made it.
//! mimalloc is built without transparent huge pages (the `no_thp` feature):
//! with them its first aligned block makes 2 MiB resident per thread.

use std::alloc::{GlobalAlloc, Layout, System};

use mimalloc::MiMalloc;

/// What `malloc` guarantees on the platforms the wheels are built for
/// (x86_64 and aarch64 glibc).
const MALLOC_ALIGN: usize = 16;

pub struct Allocator;

fn over_aligned(layout: Layout) -> bool {
    layout.align() > MALLOC_ALIGN
}

// SAFETY: each call is forwarded to one of two allocators chosen by the
// layout's alignment alone; `dealloc` and `realloc` receive the layout the
// block was allocated with, so they pick the allocator that made it.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if over_aligned(layout) {
            unsafe { MiMalloc.alloc(layout) }
        } else {
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if over_aligned(layout) {
            unsafe { MiMalloc.alloc_zeroed(layout) }
        } else {
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if over_aligned(layout) {
            unsafe { MiMalloc.dealloc(ptr, layout) }
        } else {
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if over_aligned(layout) {
            unsafe { MiMalloc.realloc(ptr, layout, new_size) }
        } else {
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" {
        fn malloc_usable_size(ptr: *mut u8) -> usize;
        fn mi_is_in_heap_region(ptr: *const u8) -> bool;
    }

    #[test]
    fn over_aligned_blocks_come_from_mimalloc_aligned_and_keep_their_bytes() {
        let layout = Layout::from_size_align(256, 128).unwrap();
        unsafe {
            let block = Allocator.alloc(layout);
            assert!(!block.is_null());
            assert_eq!(block as usize % 128, 0);
            assert!(mi_is_in_heap_region(block));
            block.write_bytes(0xAB, 256);
            let grown = Allocator.realloc(block, layout, 1024);
            assert_eq!(grown as usize % 128, 0);
            assert!((0..256).all(|i| *grown.add(i) == 0xAB));
            Allocator.dealloc(grown, Layout::from_size_align(1024, 128).unwrap());
            let zeroed = Allocator.alloc_zeroed(layout);
            assert!((0..256).all(|i| *zeroed.add(i) == 0));
            Allocator.dealloc(zeroed, layout);
        }
    }

    #[test]
    fn naturally_aligned_blocks_come_from_malloc() {
        let layout = Layout::from_size_align(100, 8).unwrap();
        unsafe {
            let block = Allocator.alloc(layout);
            assert!(!block.is_null());
            assert!(!mi_is_in_heap_region(block));
            assert!(malloc_usable_size(block) >= 100);
            Allocator.dealloc(block, layout);
        }
    }
}
