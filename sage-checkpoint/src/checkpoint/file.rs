//! [`write_file`]: a checkpoint written atomically (temporary file, sync, rename, directory sync).

/// Writes `bytes` to `path` atomically and durably: a crash or power loss at any moment
/// leaves either the old file or the complete new one under `path`, never a truncated one.
///
/// - The bytes go to a new temporary file beside `path` (same directory, so the rename
///   cannot cross file systems), named `.{file name}.{pid}.{counter}.{time}.tmp` and created
///   with `create_new` (`O_EXCL`): it is never an existing file or a symlink planted there,
///   and two saves at once — threads or processes — each write their own.
/// - The file is flushed to disk (`fsync`), renamed over `path`, and then the directory is
///   flushed too (on Unix), so the rename itself survives a power loss.
/// - On any failure the temporary file is removed and the error returned; `path` is left as
///   it was (unless only the final directory flush failed: the new file is then in place).
///
/// Concurrent saves to one path leave one of them complete under `path` (the last rename).
pub fn write_file(path: impl AsRef<std::path::Path>, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);

    let path = path.as_ref();
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: not a file path", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let (mut file, tmp) = {
        let mut attempt = 0;
        loop {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let mut tmp_name = std::ffi::OsString::from(".");
            tmp_name.push(name);
            tmp_name.push(format!(
                ".{}.{}.{nanos:08x}.tmp",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let tmp = dir.join(tmp_name);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
            {
                Ok(f) => break (f, tmp),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    };
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    drop(file);
    let written = written.and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Flushes a directory's entries (a rename in it) to disk.
#[cfg(unix)]
pub(super) fn sync_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Windows has no directory handle to flush: `MoveFileEx` is as durable as it gets there.
#[cfg(not(unix))]
pub(super) fn sync_dir(_: &std::path::Path) -> std::io::Result<()> {
    Ok(())
}
