//! Reading and writing small text and JSON files, naming the file in every error.

use std::path::Path;

use crate::error::{Error, Result};

/// Reads a whole file, naming it in the error.
pub fn read_to_string(path: impl AsRef<Path>) -> Result<String> {
    std::fs::read_to_string(path.as_ref()).map_err(|e| Error::io(path, e))
}

/// Parses a JSON file into `T`, naming the file and the offending key or line in the error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: impl AsRef<Path>) -> Result<T> {
    let text = read_to_string(path.as_ref())?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))
}

/// Writes a JSON value, pretty-printed, naming the file on failure.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}
