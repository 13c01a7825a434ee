//! Errors: an errno with context for filesystem operations, and a typed error for stack setup.

use std::fmt;
use std::path::PathBuf;

pub use rustix::io::Errno;

/// The result type of layer operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failed operation on a layer: the errno the caller should see, plus what we were doing.
///
/// Every FUSE reply maps an `Error` to its errno; the context only goes to the log.
#[derive(Debug, Clone)]
pub struct Error {
    errno: Errno,
    context: Option<Box<str>>,
}

impl Error {
    /// An error carrying only an errno.
    pub fn new(errno: Errno) -> Self {
        Self { errno, context: None }
    }

    /// The errno this error maps to.
    pub fn errno(&self) -> Errno {
        self.errno
    }

    /// Adds context (what we tried, on which path) for the log.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.context = Some(what.to_string().into_boxed_str());
        self
    }

    /// An `EIO` for data in a layer that we refuse to trust.
    pub fn corrupt(what: impl fmt::Display) -> Self {
        Self::new(Errno::IO).context(what)
    }
}

impl From<Errno> for Error {
    fn from(errno: Errno) -> Self {
        Self::new(errno)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        let errno = e.raw_os_error().map(Errno::from_raw_os_error).unwrap_or(Errno::IO);
        Self { errno, context: Some(e.to_string().into_boxed_str()) }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.context {
            Some(c) => write!(f, "{c}: {}", self.errno),
            None => write!(f, "{}", self.errno),
        }
    }
}

impl std::error::Error for Error {}

/// Why a layer stack cannot be mounted. Each message names the problem in one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StackError {
    /// A mount option we do not know.
    #[error("unknown mount option `{0}`")]
    UnknownOption(String),
    /// A known option with a value we cannot use.
    #[error("invalid value for mount option `{option}`: {reason}")]
    BadValue {
        /// The option name.
        option: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `lowerdir=` is missing or empty.
    #[error("missing lowerdir= (at least one lower directory is required)")]
    NoLower,
    /// upperdir without workdir or the other way round.
    #[error("upperdir= and workdir= must be given together")]
    UpperWithoutWork,
    /// A layer path that does not exist or is not a directory.
    #[error("{role} {path:?}: {reason}")]
    BadPath {
        /// Which layer ("lowerdir", "upperdir", "workdir").
        role: &'static str,
        /// The path given.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// Two layer paths that must be disjoint overlap.
    #[error("{a} {a_path:?} and {b} {b_path:?} overlap: {why}")]
    Overlap {
        /// First role.
        a: &'static str,
        /// First path.
        a_path: PathBuf,
        /// Second role.
        b: &'static str,
        /// Second path.
        b_path: PathBuf,
        /// Why that is not allowed.
        why: &'static str,
    },
    /// The workdir is not on the upper directory's filesystem.
    #[error("workdir {work:?} is not on the same filesystem as upperdir {upper:?}")]
    WorkdirOtherFs {
        /// The workdir.
        work: PathBuf,
        /// The upperdir.
        upper: PathBuf,
    },
    /// The inode index (`index=on`) cannot be used with these layers.
    #[error(
        "index=on: {what}: {source} (mount with index=off, or use the workdir and upperdir made with these lower layers)"
    )]
    Index {
        /// What is wrong.
        what: String,
        /// The error.
        source: Error,
    },
    /// The work dir holds the kernel's marker of an incompatible feature (`work/incompat/NAME`),
    /// which makes the kernel refuse the layers.
    #[error(
        "workdir {workdir:?} is marked with the incompatible feature {feature:?} \
         (work/incompat/{}); the kernel's overlay refuses these layers too. {}",
        feature.to_string_lossy(),
        incompat_advice(feature)
    )]
    Incompat {
        /// The workdir.
        workdir: PathBuf,
        /// The feature's name (the entry in `work/incompat`).
        feature: std::ffi::OsString,
    },
    /// Setting up the work directory failed.
    #[error("cannot prepare workdir {path:?}: {source}")]
    Workdir {
        /// The workdir.
        path: PathBuf,
        /// The error.
        source: Error,
    },
}

/// What to do about an incompatible-feature marker in a work dir.
fn incompat_advice(feature: &std::ffi::OsStr) -> &'static str {
    if feature == "volatile" {
        "A volatile mount used them (the kernel leaves this marker even at a clean unmount), and a \
         crash since then may have lost writes: if the system has not crashed since that mount, remove \
         the work/incompat/volatile directory and mount again; otherwise start over with a new upper \
         and work dir"
    } else {
        "Mount them with a kernel that knows this feature"
    }
}
