//! Atomic directory writes (DESIGN.md §3): a model directory or checkpoint is written into a
//! temporary sibling, every file synced, then renamed into place, so a reader (or a resumed run
//! after `kill -9`) never sees a half-written one.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Writes a directory atomically: `fill` writes into a temporary sibling, every file is synced,
/// then the sibling is renamed into place (replacing an older directory of that name), so a
/// reader never sees a half-written model or checkpoint.
pub fn write_dir_atomic(target: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let name = target
        .file_name()
        .ok_or_else(|| Error::input(format!("{} has no directory name", target.display())))?
        .to_string_lossy()
        .into_owned();
    remove_stale_temporaries(&parent, &name);
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    for entry in std::fs::read_dir(&tmp).map_err(|e| Error::io(&tmp, e))? {
        let path = entry.map_err(|e| Error::io(&tmp, e))?.path();
        if path.is_file() {
            let f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            f.sync_all().map_err(|e| Error::io(&path, e))?;
        }
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if target.exists() {
        std::fs::rename(target, &old).map_err(|e| Error::io(target, e))?;
    }
    std::fs::rename(&tmp, target).map_err(|e| Error::io(target, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    if let Ok(d) = std::fs::File::open(&parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Removes `.{name}.tmp-PID` / `.{name}.old-PID` siblings left by processes that no longer run
/// (a kill during a write), so they do not pile up. Linux only (`/proc`); elsewhere they stay.
fn remove_stale_temporaries(parent: &Path, name: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let pid = [".tmp-", ".old-"].iter().find_map(|tag| {
            file.strip_prefix(&format!(".{name}{tag}"))
                .and_then(|p| p.parse::<u32>().ok())
        });
        if let Some(pid) = pid {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_of_dead_writers_are_removed() {
        let dir = std::env::temp_dir().join(format!("vlalign-atomic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // PID 4194304 is above Linux's pid_max: no such process runs.
        let stale = dir.join(".model.tmp-4194304");
        std::fs::create_dir_all(&stale).unwrap();
        write_dir_atomic(&dir.join("model"), |d| {
            std::fs::write(d.join("f"), b"x").map_err(|e| Error::io(d, e))
        })
        .unwrap();
        assert!(dir.join("model/f").is_file());
        if Path::new("/proc/self").exists() {
            assert!(!stale.exists(), "stale temporary left behind");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
