//! `write_file`: atomic and durable under concurrent saves, never through a planted symlink,
//! and no temporary file left behind when it fails.

use std::path::{Path, PathBuf};

use sage_checkpoint::write_file;

/// A fresh, empty directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sage-checkpoint-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Payload `i`: distinct in every byte position, and large enough (1 MiB) that writes of
/// two threads overlap in time.
fn payload(i: u8) -> Vec<u8> {
    (0..(1 << 20))
        .map(|k: u32| (k as u8).wrapping_mul(31).wrapping_add(i))
        .collect()
}

/// Several threads save to one path at once, many times: every save succeeds, the file
/// always holds one save's bytes completely, and no temporary file remains.
#[test]
fn concurrent_saves_leave_one_complete_file() {
    let dir = scratch("concurrent");
    let path = dir.join("run.sage.safetensors");
    let payloads: Vec<Vec<u8>> = (0..6).map(payload).collect();
    std::thread::scope(|s| {
        for p in &payloads {
            let path = &path;
            s.spawn(move || {
                for _ in 0..8 {
                    write_file(path, p).unwrap();
                    // Whatever is there now is one whole save.
                    let now = std::fs::read(path).unwrap();
                    assert_eq!(now.len(), p.len(), "a torn or truncated file");
                }
            });
        }
    });
    let last = std::fs::read(&path).unwrap();
    assert!(
        payloads.contains(&last),
        "the file is a mix of several saves"
    );
    assert_eq!(entries(&dir), ["run.sage.safetensors"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A symlink planted where the old code put its temporary file (`<path>.tmp`) is not
/// followed: the file it points to is untouched, and the symlink stays a symlink.
#[cfg(unix)]
#[test]
fn a_planted_symlink_is_not_followed() {
    let dir = scratch("symlink");
    let victim = dir.join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    let path = dir.join("ckpt.safetensors");
    let planted = dir.join("ckpt.safetensors.tmp");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    write_file(&path, b"checkpoint bytes").unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    assert_eq!(std::fs::read(&path).unwrap(), b"checkpoint bytes");
    assert!(!std::fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::symlink_metadata(&planted)
        .unwrap()
        .file_type()
        .is_symlink());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A save that fails (here the rename: the target is a directory that is not empty) returns
/// the error, leaves the target as it was, and leaves no temporary file behind.
#[test]
fn a_failed_save_leaves_no_temporary_file() {
    let dir = scratch("failure");
    let path = dir.join("taken");
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("inside"), b"x").unwrap();
    assert!(write_file(&path, b"checkpoint bytes").is_err());
    assert_eq!(entries(&dir), ["taken"]);
    assert_eq!(entries(&path), ["inside"]);
    // A directory that does not exist: an error, nothing created.
    let missing = dir.join("no-such-dir").join("ckpt");
    assert!(write_file(&missing, b"x").is_err());
    assert_eq!(entries(&dir), ["taken"]);
    // A path with no file name.
    assert!(write_file(Path::new("/"), b"x").is_err());
    // And a save that works replaces the old file.
    let ok = dir.join("ok");
    write_file(&ok, b"one").unwrap();
    write_file(&ok, b"two").unwrap();
    assert_eq!(std::fs::read(&ok).unwrap(), b"two");
    assert_eq!(entries(&dir), ["ok", "taken"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
