//! Library errors: each names what went wrong and where (a path, a tensor, a config key), in one line.

use std::path::{Path, PathBuf};

/// Every fallible library call returns this. The CLI prints it on one line and exits 1.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written. (The OS error is part of the message,
    /// not a chained source, so a one-line report names it once.)
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
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
    /// A computation gave NaN or infinity (from corrupt weights, a bad config value or a
    /// diverged run): such a result is never printed, ranked or saved.
    #[error("{0}")]
    NonFinite(String),
    /// An error raised inside candle (shapes, dtypes, devices).
    #[error("tensor error: {0}")]
    Candle(candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            error,
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

impl From<candle_core::Error> for Error {
    /// Drops the backtrace candle attaches when `RUST_BACKTRACE` is set: an error is one line.
    fn from(e: candle_core::Error) -> Self {
        let mut e = e;
        while let candle_core::Error::WithBacktrace { inner, .. } = e {
            e = *inner;
        }
        Error::Candle(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_one_line_and_name_their_cause_once() {
        let io = Error::io(
            "/x/y.png",
            std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
        );
        let shown = format!("{:#}", anyhow::Error::new(io));
        assert_eq!(shown, "/x/y.png: gone");
        let bt = candle_core::Error::Msg("bad shape".into()).bt();
        let e: Error = bt.into();
        assert_eq!(e.to_string(), "tensor error: bad shape");
    }
}
