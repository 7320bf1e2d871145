//! The few system calls std does not wrap. All unsafe of the gateway's file
//! and process handling lives here.

use std::io;
use std::os::fd::AsRawFd;

/// Allocates `len` bytes of real disk blocks for `file` (never a sparse hole,
/// so writing through a mapping can not SIGBUS on a full disk later).
pub fn fallocate(file: &std::fs::File, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Raises RLIMIT_MEMLOCK to at least `bytes` where the process may (root, or
/// a hard limit that allows it). Returns the soft limit in force afterwards.
pub fn raise_memlock(bytes: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass; it lives across the call.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < bytes {
        let want = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: lim.rlim_max.max(bytes),
        };
        // SAFETY: setrlimit reads the struct we pass. Failure is fine (not root).
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &want) } == 0 {
            lim = want;
        }
    }
    lim.rlim_cur
}

/// Raises RLIMIT_NOFILE's soft limit to its hard limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as above.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
    lim.rlim_cur
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write within it, and
    // sched_setaffinity reads it for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the zeroed set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// A boxed slice of `n` zero-initialised `T`, whose memory is advised to use
/// transparent huge pages before it is first touched (a large hash table
/// probed at random otherwise pays a TLB miss on nearly every lookup), then
/// faulted in.
///
/// # Safety
///
/// Only for types whose all-zero bit pattern is a valid value (atomics and
/// integers).
unsafe fn zeroed_huge_slice<T>(n: usize) -> Box<[T]> {
    assert!(n > 0 && std::mem::size_of::<T>() > 0);
    let layout = std::alloc::Layout::array::<T>(n).expect("table size overflows");
    // SAFETY: the layout has non-zero size (asserted above).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) } as *mut T;
    if ptr.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    let page = 4096usize;
    let start = (ptr as usize).next_multiple_of(page);
    let end = (ptr as usize + layout.size()) & !(page - 1);
    if end > start {
        // SAFETY: [start, end) lies within the allocation we own; MADV_HUGEPAGE
        // changes no contents, only how later faults are served.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
    // Touch every page now, at start-up: faulting the table in on the request
    // path costs a huge-page allocation (and possibly compaction) inside some
    // unlucky request's latency.
    for off in (0..layout.size()).step_by(page) {
        // SAFETY: `off` is inside the allocation; writing the zero it already
        // holds changes nothing but makes the kernel back the page.
        unsafe { std::ptr::write_volatile((ptr as *mut u8).add(off), 0) };
    }
    // SAFETY: `ptr` came from the global allocator with the layout of `[T; n]`,
    // is zero-initialised, and zero is a valid `T` (the caller's contract), so
    // Box may own and later free it with that same layout.
    unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, n)) }
}

/// `n` empty dedup slots on huge pages (for `DedupTable::new_in`).
pub fn huge_dedup_slots(n: usize) -> Box<[gateway_core::dedup::Slot]> {
    // SAFETY: a Slot holds only atomics, and all-zero bytes are an empty
    // slot (its documented contract).
    unsafe { zeroed_huge_slice(n) }
}

/// `n` zeroed atomic words on huge pages (for `VelocityTable::new_in`).
pub fn huge_atomic_words(n: usize) -> Box<[std::sync::atomic::AtomicU64]> {
    // SAFETY: zero is a valid AtomicU64.
    unsafe { zeroed_huge_slice(n) }
}

/// Takes an exclusive, non-blocking flock on `path` (created if missing) and
/// returns the open file that holds it; the lock lasts as long as the file.
pub fn lock_exclusive(path: &std::path::Path) -> io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    // SAFETY: flock on an fd we own; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

/// Lowers the calling thread's scheduling priority (Linux nice values are per
/// thread). Failure is harmless.
pub fn lower_thread_priority(nice: i32) {
    let _ = set_thread_nice(gettid(), nice);
}

/// Sets the nice value of thread `tid` of this process.
pub fn set_thread_nice(tid: i32, nice: i32) -> io::Result<()> {
    // SAFETY: setpriority takes no pointers.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The nice value of thread `tid` (of any process).
pub fn thread_nice(tid: i32) -> io::Result<i32> {
    // SAFETY: getpriority takes no pointers; -1 is a valid nice value, so
    // errno, cleared first, tells it from an error.
    unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        if n == -1 && *libc::__errno_location() != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n)
    }
}

/// CPU time the calling thread has used, ns.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// The io_uring worker threads of process `pid`: those created by thread
/// `owner` (the kernel names them `iou-wrk-<owner>`), or all of them.
pub fn io_workers(pid: u32, owner: Option<i32>) -> io::Result<Vec<i32>> {
    let name = owner.map(|o| format!("iou-wrk-{o}"));
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread that exits between the listing and this read is skipped.
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        let comm = comm.trim_end();
        if name
            .as_deref()
            .map_or(comm.starts_with("iou-wrk-"), |n| comm == n)
        {
            out.push(tid);
        }
    }
    Ok(out)
}

/// Sets the nice value of the io_uring worker threads that the thread
/// `owner` of this process created; they run what its ring could not do
/// inline (the shard's durable writes). Returns how many were set. A worker
/// inherits its creator's nice when it is created, and workers come and go,
/// so callers repeat this. Raising priority (a negative value) needs
/// CAP_SYS_NICE or an `RLIMIT_NICE` that allows it: EACCES or EPERM then.
pub fn renice_io_workers(owner: i32, nice: i32) -> io::Result<usize> {
    let workers = io_workers(std::process::id(), Some(owner))?;
    for &tid in &workers {
        match set_thread_nice(tid, nice) {
            // Exited since the listing.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            r => r?,
        }
    }
    Ok(workers.len())
}

/// Turns Nagle's algorithm off on a TCP socket: answers and requests are
/// whole messages, and waiting to coalesce them only adds latency.
pub fn set_nodelay(fd: std::os::fd::RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `one` for the duration of the call; a bad fd
    // only makes it fail, which is harmless here.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nice values of the threads named `iou-wrk-<owner>`.
    fn worker_nices(owner: i32) -> Vec<i32> {
        io_workers(std::process::id(), Some(owner))
            .unwrap()
            .into_iter()
            .filter_map(|t| thread_nice(t).ok())
            .collect()
    }

    #[test]
    fn a_threads_io_uring_workers_get_the_nice_value() {
        // Raising the nice value (lower priority) needs no privilege, so
        // this runs anywhere; the gateway lowers it, which needs CAP_SYS_NICE.
        let (before, changed, after) = std::thread::spawn(|| {
            let me = gettid();
            let mut ring = io_uring::IoUring::new(8).unwrap();
            let f = tempfile::tempfile().unwrap();
            let buf = [7u8; 512];
            // IOSQE_ASYNC: the write runs on an io-wq worker whatever the
            // file system, as a durable write does on ext4.
            let e =
                io_uring::opcode::Write::new(io_uring::types::Fd(f.as_raw_fd()), buf.as_ptr(), 512)
                    .build()
                    .flags(io_uring::squeue::Flags::ASYNC);
            // SAFETY: `buf` outlives the write, which completes below.
            unsafe { ring.submission().push(&e).unwrap() };
            ring.submit_and_wait(1).unwrap();
            assert_eq!(ring.completion().next().unwrap().result(), 512);
            let before = worker_nices(me);
            let changed = renice_io_workers(me, 7).unwrap();
            (before, changed, worker_nices(me))
        })
        .join()
        .unwrap();
        assert!(!before.is_empty(), "no io-wq worker was seen");
        assert!(before.iter().all(|&n| n != 7));
        assert!(changed >= 1);
        assert!(after.iter().all(|&n| n == 7), "{after:?}");
    }
}
