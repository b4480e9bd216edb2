//! Library errors: each names what went wrong and where (a path, a tensor, a config key), in one line.

use std::path::{Path, PathBuf};

/// Every fallible library call returns this. The CLI prints it on one line and exits 1.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A configuration file is malformed, has an unknown key or an invalid value.
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    /// A checkpoint does not match the model its config describes.
    #[error("{}: {msg}", path.display())]
    Weights { path: PathBuf, msg: String },
    /// An image file that cannot be decoded.
    #[error("{}: not a readable image ({msg})", path.display())]
    Image { path: PathBuf, msg: String },
    /// A tokenizer file that cannot be loaded or used.
    #[error("{}: tokenizer error: {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },
    /// Bad input from the caller: an empty label list, a tensor of the wrong shape, ...
    #[error("{0}")]
    Input(String),
    /// An error raised inside candle (shapes, dtypes, devices).
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub fn config(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn weights(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Weights {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }
}
