//! All of the core's `unsafe`, three small things the hot path needs and
//! safe Rust does not offer at the same cost:
//!
//! - [`prefetch`]: a cache hint. The host-wide tables are far larger than
//!   the caches, and asking for a slot's line while the MAC is computed
//!   hides most of a miss to memory. Stable Rust has no safe prefetch, and
//!   SSE intrinsics are target-feature functions, which take an `unsafe`
//!   block even where SSE is baseline (every x86_64).
//! - [`for_each_special`]: the query scan, sixteen bytes at a time (SSE2).
//! - [`graphic_str`]: a `str` of bytes already checked to be printable ASCII.

/// Starts loading the cache line of `v`, so that its miss to memory overlaps
/// other work.
#[inline]
pub fn prefetch<T>(v: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it never faults and reads nothing into
    // the program's state, whatever the address (this one is a reference).
    // SSE, the feature it needs, is part of the x86_64 baseline.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>((v as *const T).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

/// `v` as a `str`, once `all_graphic(v)` has been checked: printable ASCII
/// is valid UTF-8, so validating it again would only repeat that scan.
pub fn graphic_str(v: &[u8]) -> &str {
    debug_assert!(v.iter().all(u8::is_ascii_graphic));
    // SAFETY: every byte is in b'!'..=b'~' (checked by the caller, asserted in
    // debug builds), and any sequence of ASCII bytes is valid UTF-8.
    unsafe { std::str::from_utf8_unchecked(v) }
}

/// Calls `f(position, byte)` for every `&`, `=` and `%` of `s`, in order:
/// sixteen bytes compared at a time, then each hit taken from a bit mask
/// (an iterator of memchr searches, one call per hit, measured slower).
pub fn for_each_special(s: &[u8], mut f: impl FnMut(usize, u8)) {
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
        };
        // SAFETY: SSE2 is part of the x86_64 baseline, so every instruction
        // here exists on any CPU this code runs on; the one load reads the
        // 16 bytes of `chunk`, which are in bounds (it may be unaligned).
        unsafe {
            let amp = _mm_set1_epi8(b'&' as i8);
            let eq = _mm_set1_epi8(b'=' as i8);
            let pct = _mm_set1_epi8(b'%' as i8);
            while let Some(chunk) = s.get(i..i + 16) {
                let v = _mm_loadu_si128(chunk.as_ptr().cast());
                let hits = _mm_or_si128(
                    _mm_or_si128(_mm_cmpeq_epi8(v, amp), _mm_cmpeq_epi8(v, eq)),
                    _mm_cmpeq_epi8(v, pct),
                );
                let mut bits = _mm_movemask_epi8(hits) as u32;
                while bits != 0 {
                    let at = i + bits.trailing_zeros() as usize;
                    f(at, s[at]);
                    bits &= bits - 1;
                }
                i += 16;
            }
        }
    }
    for (at, &b) in s.iter().enumerate().skip(i) {
        if matches!(b, b'&' | b'=' | b'%') {
            f(at, b);
        }
    }
}
