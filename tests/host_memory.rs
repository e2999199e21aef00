//! `keep_freed_memory`: after it, memory freed by a large allocation is reused by the next one
//! without page faults. Its own test binary, since the setting is process-wide.

const BLOCK: usize = 16 << 20;

/// Minor page faults of this process so far (Linux: /proc/self/stat, field 10).
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which may hold spaces): state is field 3, minflt field 10.
    let rest = &stat[stat.rfind(')').expect("comm") + 1..];
    rest.split_whitespace()
        .nth(7)
        .expect("minflt")
        .parse()
        .expect("a count")
}

/// Allocate 16 MiB (a size whose blocks glibc maps and unmaps by default), touch every page, free it; the minor faults this took.
fn faults_of_one_block() -> u64 {
    let before = minor_faults();
    let v = std::hint::black_box(vec![1u8; BLOCK]);
    drop(v);
    minor_faults() - before
}

#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn freed_memory_is_reused_without_page_faults() {
    let pages = (BLOCK / 4096) as u64;
    // Without the setting the block is mmapped and unmapped: every page faults.
    let plain = faults_of_one_block();
    assert!(plain >= pages / 2, "{plain} faults for {pages} pages");
    assert!(steer::keep_freed_memory(), "glibc refused the settings");
    faults_of_one_block(); // the heap grows once
    let kept = faults_of_one_block();
    assert!(
        kept < pages / 50,
        "{kept} faults for {pages} pages on reuse"
    );
}
