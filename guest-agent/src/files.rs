//! File operations. One dedicated thread takes them off the runtime (it
//! blocks on its queue while idle: no wake-ups) and, as init, hands them to
//! a helper process that is the sandbox user for real (file_helper.rs):
//! permission checks and ownership are the user's, not root's.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use airlock_protocol::{
    DEFAULT_LIST_ENTRIES, ErrorBody, ErrorCode, FileData, FileKind, FileList, FileStat, ListFiles,
    MAX_FILE_LEN, MAX_HEADER_LEN, MAX_LIST_DEPTH, MAX_LIST_ENTRIES, Message, ReadFile, RemoveFile,
    WriteFile,
};
use tokio::sync::oneshot;

use crate::file_helper::Helper;
use crate::log::log;
use crate::ops::resolve;
use crate::sys::Creds;

type Job = (Message, Vec<u8>, oneshot::Sender<(Message, Vec<u8>)>);

pub struct Files {
    tx: mpsc::Sender<Job>,
}

impl Files {
    /// With `creds` (as init), requests go to a helper process running as
    /// that user (see file_helper.rs); without (debug mode), this thread
    /// does them as the current user.
    pub fn start(creds: Option<Creds>, home: PathBuf) -> Files {
        let (tx, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("files".into())
            .spawn(move || {
                let mut helper: Option<Helper> = None;
                for (message, payload, reply) in rx {
                    let result = match creds {
                        Some(creds) => via_helper(&mut helper, creds, &home, message, payload),
                        None => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            run(&home, message, payload)
                        }))
                        .unwrap_or_else(|_| {
                            (
                                Message::error(ErrorCode::Internal, "the file operation panicked"),
                                Vec::new(),
                            )
                        }),
                    };
                    let _ = reply.send(result);
                }
            });
        if let Err(e) = spawned {
            log!("cannot start the file thread: {e}");
        }
        Files { tx }
    }

    /// Runs one file request on the file thread; the final message and its
    /// payload.
    pub async fn call(&self, message: Message, payload: Vec<u8>) -> (Message, Vec<u8>) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send((message, payload, tx)).is_err() {
            return (
                Message::error(ErrorCode::Internal, "the file thread is gone"),
                Vec::new(),
            );
        }
        rx.await.unwrap_or_else(|_| {
            (
                Message::error(ErrorCode::Internal, "the file thread dropped the request"),
                Vec::new(),
            )
        })
    }
}

/// Hands one request to the helper, starting one if there is none; a
/// helper that fails is dropped (killed) and the next request starts anew.
/// A failed request is not retried: it may have half happened.
fn via_helper(
    helper: &mut Option<Helper>,
    creds: Creds,
    home: &Path,
    message: Message,
    payload: Vec<u8>,
) -> (Message, Vec<u8>) {
    let failed = |what: &str, e: io::Error| {
        log!("file helper: {what}: {e}");
        (
            Message::error(
                ErrorCode::Internal,
                format!("the file operation failed ({what}: {e}); try again"),
            ),
            Vec::new(),
        )
    };
    if helper.is_none() {
        match Helper::start(creds, home) {
            Ok(started) => *helper = Some(started),
            Err(e) => return failed("cannot start the helper as the sandbox user", e),
        }
    }
    let Some(running) = helper.as_mut() else {
        return failed("no helper", io::Error::other("none running"));
    };
    match running.call(message, payload) {
        Ok(answer) => answer,
        Err(e) => {
            *helper = None;
            failed("the helper stopped answering", e)
        }
    }
}

/// Does one file request as the current process's user.
pub fn run(home: &Path, message: Message, payload: Vec<u8>) -> (Message, Vec<u8>) {
    let result = match message {
        Message::WriteFile(req) => {
            write_file(home, req, &payload).map(|s| (Message::FileStat(s), Vec::new()))
        }
        Message::ReadFile(req) => {
            read_file(home, req).map(|(d, bytes)| (Message::FileData(d), bytes))
        }
        Message::ListFiles(req) => list(home, req).map(|l| (Message::FileList(l), Vec::new())),
        Message::RemoveFile(req) => remove(home, req).map(|()| (Message::Done, Vec::new())),
        Message::StatFile(req) => {
            let path = resolve(home, &req.path);
            stat(&path)
                .map(|s| (Message::FileStat(s), Vec::new()))
                .map_err(|e| io_error(e, &path))
        }
        other => Err(error(
            ErrorCode::Protocol,
            format!("{:?} is not a file request", other.kind()),
        )),
    };
    result.unwrap_or_else(|e| (Message::Error(e), Vec::new()))
}

/// An I/O error as an error message naming the path.
pub fn io_error(e: io::Error, path: &Path) -> ErrorBody {
    let code = match e.raw_os_error() {
        Some(libc::ENOENT) => ErrorCode::NotFound,
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => ErrorCode::PermissionDenied,
        Some(libc::EEXIST) => ErrorCode::AlreadyExists,
        Some(libc::ENOSPC | libc::EDQUOT) => ErrorCode::NoSpace,
        Some(libc::EFBIG) => ErrorCode::TooLarge,
        Some(
            libc::ENOTDIR
            | libc::EISDIR
            | libc::ENOTEMPTY
            | libc::EINVAL
            | libc::ELOOP
            | libc::ENAMETOOLONG,
        ) => ErrorCode::BadRequest,
        _ => ErrorCode::Io,
    };
    let what = match e.raw_os_error() {
        Some(libc::ENOSPC) => {
            "no space left on the file system (the sandbox's disk is full)".to_string()
        }
        Some(libc::EROFS) => {
            "read-only file system (write under /home/sandbox or /tmp)".to_string()
        }
        _ => {
            // io::Error's text ends with "(os error N)"; keep the words.
            let text = e.to_string();
            text.split(" (os error").next().unwrap_or(&text).to_string()
        }
    };
    error(code, format!("{}: {what}", path.display()))
}

fn error(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
    ErrorBody {
        code,
        message: message.into(),
    }
}

fn write_file(home: &Path, req: WriteFile, content: &[u8]) -> Result<FileStat, ErrorBody> {
    let path = resolve(home, &req.path);
    if content.len() as u64 > MAX_FILE_LEN {
        return Err(error(
            ErrorCode::TooLarge,
            format!(
                "{} bytes exceeds the file size limit of {MAX_FILE_LEN} bytes",
                content.len()
            ),
        ));
    }
    if let Some(mode) = req.mode
        && mode > 0o7777
    {
        return Err(error(
            ErrorCode::BadRequest,
            format!("invalid mode {mode:#o}"),
        ));
    }
    if req.create_parents
        && let Some(parent) = path.parent()
    {
        fs::create_dir_all(parent).map_err(|e| io_error(e, parent))?;
    }
    let existed = path.symlink_metadata().is_ok();
    let mut options = OpenOptions::new();
    options
        .write(true)
        .create(true)
        .mode(req.mode.unwrap_or(0o644));
    if req.append {
        options.append(true);
    } else {
        options.truncate(true);
    }
    let mut file = options.open(&path).map_err(|e| io_error(e, &path))?;
    if let Err(e) = file.write_all(content) {
        drop(file);
        if !existed {
            // Do not leave half a file behind (it would also keep the space).
            let _ = fs::remove_file(&path);
        }
        return Err(io_error(e, &path));
    }
    if let Some(mode) = req.mode
        && existed
    {
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| io_error(e, &path))?;
    }
    drop(file);
    stat(&path).map_err(|e| io_error(e, &path))
}

fn read_file(home: &Path, req: ReadFile) -> Result<(FileData, Vec<u8>), ErrorBody> {
    let path = resolve(home, &req.path);
    let mut file = File::open(&path).map_err(|e| io_error(e, &path))?;
    let meta = file.metadata().map_err(|e| io_error(e, &path))?;
    if meta.is_dir() {
        return Err(error(
            ErrorCode::BadRequest,
            format!("{}: is a directory (use list_files)", path.display()),
        ));
    }
    let size = meta.len();
    let want = match req.length {
        Some(n) => n.min(MAX_FILE_LEN),
        None if size.saturating_sub(req.offset) > MAX_FILE_LEN => {
            return Err(error(
                ErrorCode::TooLarge,
                format!(
                    "{} is {size} bytes, more than the {MAX_FILE_LEN}-byte limit of one read; \
                     read it in ranges (offset and length)",
                    path.display()
                ),
            ));
        }
        // Files that report no size (procfs) are read up to the limit.
        None => MAX_FILE_LEN,
    };
    if req.offset > 0 {
        file.seek(SeekFrom::Start(req.offset))
            .map_err(|e| io_error(e, &path))?;
    }
    let mut bytes = Vec::with_capacity(want.min(size.saturating_sub(req.offset)) as usize);
    (&mut file)
        .take(want)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(e, &path))?;
    let end = req.offset + bytes.len() as u64;
    // At the end if we got less than asked for, or reached the known size.
    let eof = (bytes.len() as u64) < want || (size > 0 && end >= size);
    Ok((
        FileData {
            size: size.max(end),
            offset: req.offset,
            eof,
        },
        bytes,
    ))
}

fn list(home: &Path, req: ListFiles) -> Result<FileList, ErrorBody> {
    let root = resolve(home, &req.path);
    let max_entries = req
        .max_entries
        .unwrap_or(DEFAULT_LIST_ENTRIES)
        .clamp(1, MAX_LIST_ENTRIES) as usize;
    let max_depth = if req.recursive {
        req.max_depth
            .unwrap_or(MAX_LIST_DEPTH)
            .clamp(1, MAX_LIST_DEPTH)
    } else {
        1
    };
    let meta = root.symlink_metadata().map_err(|e| io_error(e, &root))?;
    if !meta.is_dir() {
        return Err(error(
            ErrorCode::BadRequest,
            format!("{}: not a directory (use stat_file)", root.display()),
        ));
    }
    // Keep the reply's JSON header well inside the frame limit.
    let header_budget = MAX_HEADER_LEN / 2;
    let mut out = FileList::default();
    let mut used = 0usize;
    // Depth-first, parents before children, names sorted in each directory.
    let mut stack: Vec<(PathBuf, u32)> = vec![(root.clone(), 1)];
    let mut first_error = None;
    while let Some((dir, depth)) = stack.pop() {
        let mut names: Vec<PathBuf> = match fs::read_dir(&dir) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(e) => {
                if dir == root {
                    return Err(io_error(e, &dir));
                }
                first_error.get_or_insert(e);
                continue;
            }
        };
        names.sort();
        let mut subdirs = Vec::new();
        for path in names {
            if out.entries.len() >= max_entries || used >= header_budget {
                out.truncated = true;
                return Ok(out);
            }
            let Ok(entry) = stat(&path) else { continue };
            used += entry.path.len() + entry.link_target.as_ref().map_or(0, String::len) + 128;
            if entry.kind == FileKind::Dir {
                if depth < max_depth {
                    subdirs.push(path.clone());
                } else if req.recursive {
                    out.truncated = true;
                }
            }
            out.entries.push(entry);
        }
        // Reverse, so the first subdirectory is listed next (depth first
        // would interleave; keep it simple: breadth per directory).
        for d in subdirs.into_iter().rev() {
            stack.push((d, depth + 1));
        }
    }
    Ok(out)
}

fn remove(home: &Path, req: RemoveFile) -> Result<(), ErrorBody> {
    let path = resolve(home, &req.path);
    let meta = path.symlink_metadata().map_err(|e| io_error(e, &path))?;
    let result = if meta.is_dir() {
        if req.recursive {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_dir(&path)
        }
    } else {
        fs::remove_file(&path)
    };
    result.map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOTEMPTY) {
            error(
                ErrorCode::BadRequest,
                format!(
                    "{}: directory not empty (set recursive to remove it and its contents)",
                    path.display()
                ),
            )
        } else {
            io_error(e, &path)
        }
    })
}

pub fn stat(path: &Path) -> io::Result<FileStat> {
    let meta = path.symlink_metadata()?;
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        FileKind::File
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    };
    let link_target = if ft.is_symlink() {
        fs::read_link(path)
            .ok()
            .map(|t| t.to_string_lossy().into_owned())
    } else {
        None
    };
    Ok(FileStat {
        path: path.to_string_lossy().into_owned(),
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        mtime_ms: meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000,
        uid: meta.uid(),
        gid: meta.gid(),
        link_target,
    })
}
