//! Reading `policy.toml` files written by tenants, defensively.
//!
//! Only a regular file is read: a symbolic link named `policy.toml` is refused whatever it
//! points to (so it cannot expose a file outside the document root, nor one the tenant
//! cannot read), and so are FIFOs, sockets and devices. The file is opened with
//! `O_NOFOLLOW | O_NONBLOCK`, so swapping in a link or a FIFO between the check and the
//! open can neither redirect the read nor block the caller, and checked again once open.
//! At most [`MAX_POLICY_FILE_SIZE`] bytes are read. Problems say what is wrong with the
//! file, never what is in it. [`Presence`] is what the sweep compares to notice a change.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// The largest policy file read, in bytes; a larger one is a problem, not read.
pub const MAX_POLICY_FILE_SIZE: u64 = 64 << 10;

/// What a `policy.toml` path held when last looked at. Two equal values mean "unchanged":
/// device, inode, size, mode and both mtime and ctime to the nanosecond.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Presence {
    Absent,
    Present(Stamp),
    /// `lstat` failed other than "not found" (e.g. permission denied).
    Unstatable(io::ErrorKind),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mode: u32,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mode: m.mode(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

fn absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// Looks at `path` without following a symbolic link.
pub(crate) fn presence(path: &Path) -> Presence {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Presence::Present(Stamp::of(&m)),
        Err(e) if absent(&e) => Presence::Absent,
        Err(e) => Presence::Unstatable(e.kind()),
    }
}

/// What reading a policy file gave.
#[derive(Debug)]
pub(crate) enum Contents {
    Absent,
    /// The bytes, or why they could not be read (a message without the file's content).
    Present(Result<Vec<u8>, String>),
}

/// Reads the policy file at `path`: its presence (as [`presence`] would see the file that
/// was actually read) and its contents.
pub(crate) fn read(path: &Path) -> (Presence, Contents) {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if absent(&e) => return (Presence::Absent, Contents::Absent),
        Err(e) => {
            let why = format!("cannot be read: {}", e.kind());
            return (Presence::Unstatable(e.kind()), Contents::Present(Err(why)));
        }
    };
    let seen = Presence::Present(Stamp::of(&meta));
    if let Err(why) = acceptable(&meta) {
        return (seen, Contents::Present(Err(why)));
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return (seen, Contents::Present(Err(SYMLINK.into())));
        }
        Err(e) if absent(&e) => return (Presence::Absent, Contents::Absent),
        Err(e) => {
            let why = format!("cannot be read: {}", e.kind());
            return (seen, Contents::Present(Err(why)));
        }
    };
    let (seen, bytes) = read_open(file);
    (seen, Contents::Present(bytes))
}

const SYMLINK: &str = "is a symbolic link; a policy file must be a regular file in its directory";

fn acceptable(meta: &Metadata) -> Result<(), String> {
    let kind = meta.file_type();
    if kind.is_symlink() {
        return Err(SYMLINK.into());
    }
    if !kind.is_file() {
        return Err("is not a regular file".into());
    }
    if meta.len() > MAX_POLICY_FILE_SIZE {
        return Err(too_large());
    }
    Ok(())
}

fn too_large() -> String {
    format!(
        "is larger than {}, the most a policy file may be",
        crate::units::format_size(MAX_POLICY_FILE_SIZE)
    )
}

fn read_open(file: File) -> (Presence, Result<Vec<u8>, String>) {
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => {
            return (
                Presence::Unstatable(e.kind()),
                Err(format!("cannot be read: {}", e.kind())),
            )
        }
    };
    let seen = Presence::Present(Stamp::of(&meta));
    if let Err(why) = acceptable(&meta) {
        return (seen, Err(why));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    match file.take(MAX_POLICY_FILE_SIZE + 1).read_to_end(&mut bytes) {
        Ok(_) if bytes.len() as u64 > MAX_POLICY_FILE_SIZE => (seen, Err(too_large())),
        Ok(_) => (seen, Ok(bytes)),
        Err(e) => (seen, Err(format!("cannot be read: {}", e.kind()))),
    }
}
