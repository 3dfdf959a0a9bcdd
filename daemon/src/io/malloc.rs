//! The C allocator's arenas. glibc gives threads that allocate at the same time arenas of
//! their own (up to 8 per core), and memory freed in one arena is reused only by allocations
//! in that arena: the agent's watch tasks, blocking compiles and writers move between the
//! runtime's threads, so what one arena freed after the start-up lists stays resident while
//! another grows. The agent allocates nothing per packet, so contention on fewer arenas is
//! not on the data path.

/// Arenas the agent allows unless `MALLOC_ARENA_MAX` says otherwise.
pub const AGENT_ARENAS: i32 = 2;

/// Limits glibc's malloc to `n` arenas, unless the environment sets `MALLOC_ARENA_MAX` (read
/// by glibc itself, and left to win). Call before threads start. Returns whether the limit
/// was set (always false with another C library, which has no such setting).
pub fn limit_arenas(n: i32) -> bool {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return false;
    }
    set_arena_max(n)
}

#[cfg(target_env = "gnu")]
fn set_arena_max(n: i32) -> bool {
    // SAFETY: mallopt only sets a tuning parameter of the allocator; any value is accepted or
    // refused (0) without touching memory the program holds.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, n) == 1 }
}

#[cfg(not(target_env = "gnu"))]
fn set_arena_max(_: i32) -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_env = "gnu")]
    fn glibc_takes_the_limit() {
        assert!(super::set_arena_max(super::AGENT_ARENAS));
    }
}
