//! A file system of a chosen size, to fill on purpose.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A tmpfs of `bytes` mounted on a directory (root only: `mount` returns
/// None otherwise, and the test says it skipped), unmounted on drop.
pub struct SmallFs(PathBuf);

impl SmallFs {
    pub fn mount(dir: &Path, bytes: usize) -> Option<SmallFs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallFs(dir.to_owned()))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
