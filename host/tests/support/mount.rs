//! A ConfigMap or Secret volume laid out and updated the way the kubelet's atomic
//! writer does it:
//!
//! ```text
//! tls.crt -> ..data/tls.crt
//! tls.key -> ..data/tls.key
//! ..data  -> ..2026_11_22_10_00_00.000000001/   (the files themselves)
//! ```
//!
//! An update writes every file into a new timestamped folder, points a `..data_tmp`
//! symlink at it, renames that over `..data` (one atomic step for all files) and
//! removes the old folder. A program that watches the mount sees every key change at
//! once, and never a half-written file.

use std::path::{Path, PathBuf};
use std::time::Instant;

/// A volume in a folder of the test, with its keys as symlinks through `..data`.
pub struct KubeletVolume {
    dir: PathBuf,
    current: String,
}

impl KubeletVolume {
    /// Lays out the volume in `dir` (an existing, empty folder) with `files`
    /// (key, contents) in the timestamped folder `stamp`.
    pub fn create<B: AsRef<[u8]>>(dir: &Path, stamp: &str, files: &[(&str, B)]) -> KubeletVolume {
        write_folder(&dir.join(stamp), files);
        std::os::unix::fs::symlink(stamp, dir.join("..data")).expect("..data symlink");
        for (key, _) in files {
            std::os::unix::fs::symlink(format!("..data/{key}"), dir.join(key))
                .unwrap_or_else(|e| panic!("symlink for key {key}: {e}"));
        }
        KubeletVolume {
            dir: dir.to_path_buf(),
            current: stamp.to_string(),
        }
    }

    /// The path a container sees for `key`.
    pub fn file(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// Replaces all files at once (same keys as at creation) from the new timestamped
    /// folder `stamp`, then removes the old folder. Returns the moment of the swap.
    pub fn update<B: AsRef<[u8]>>(&mut self, stamp: &str, files: &[(&str, B)]) -> Instant {
        write_folder(&self.dir.join(stamp), files);
        std::os::unix::fs::symlink(stamp, self.dir.join("..data_tmp")).expect("..data_tmp symlink");
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).expect("swap ..data");
        let swapped = Instant::now();
        std::fs::remove_dir_all(self.dir.join(&self.current)).expect("remove the old folder");
        self.current = stamp.to_string();
        swapped
    }
}

fn write_folder<B: AsRef<[u8]>>(folder: &Path, files: &[(&str, B)]) {
    std::fs::create_dir(folder).unwrap_or_else(|e| panic!("mkdir {}: {e}", folder.display()));
    for (key, bytes) in files {
        let path = folder.join(key);
        std::fs::write(&path, bytes.as_ref()).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}
