//! A data dir whose filesystem has free bytes but no inodes left refuses
//! every file write: `/healthz` must say so (503 with the reason), not only
//! when bytes run out. Needs root (a tmpfs with few inodes).

mod common;

use common::*;

#[test]
fn healthz_is_503_while_the_data_dir_has_no_inodes_left() {
    test_image();
    let disk = Tmpfs::mount_with_inodes(64, 400);
    let data = disk.path().join("data");
    let d = Daemon::start_on(
        &data,
        "[store]\nmin_free_bytes = 1048576\nballast_bytes = 0",
    );
    let (code, health) = d.health();
    assert_eq!(code, 200, "{health}");
    // Every inode left goes to files of the test's own, beside the data dir.
    let filler = disk.path().join("filler");
    std::fs::create_dir(&filler).expect("filler dir");
    let mut made = 0u64;
    loop {
        match std::fs::File::create(filler.join(made.to_string())) {
            Ok(_) => made += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("creating a filler file: {e}"),
        }
    }
    assert!(made > 0);
    assert!(disk.free_bytes() > 32 << 20, "bytes are still free");
    let (code, health) = d.health();
    assert_eq!(code, 503, "{health}");
    assert_eq!(health["Status"], "unavailable", "{health}");
    let why = health["Store"].as_str().unwrap_or("");
    assert!(why.contains("free inodes"), "{why}");
    // Given back: healthy again.
    std::fs::remove_dir_all(&filler).expect("remove the filler");
    let (code, health) = d.health();
    assert_eq!(code, 200, "{health}");
    d.finish();
}
