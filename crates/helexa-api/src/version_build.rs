//! The build-script half of `/version` (see `version.rs`): finds the git
//! commit, the enabled cargo features and candle's version, and hands them
//! to the compiler as `HELEXA_*` environment variables.
//!
//! Standard library only, so that a binary's `build.rs` can include this file
//! (`#[path = "../crates/helexa-api/src/version_build.rs"] mod version_build;`)
//! without a build dependency. helexa-api also compiles it, to test it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Emits `cargo:rustc-env=HELEXA_GIT_SHA / HELEXA_FEATURES /
/// HELEXA_CANDLE_VERSION` and the rerun rules. Call from `build.rs`.
pub fn emit() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    println!("cargo:rerun-if-env-changed=HELEXA_GIT_SHA");
    let sha = match std::env::var("HELEXA_GIT_SHA") {
        Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
        _ => {
            for path in git_watch_paths(&manifest) {
                println!("cargo:rerun-if-changed={}", path.display());
            }
            git_sha(&manifest).unwrap_or_else(|| "unknown".to_string())
        }
    };
    println!("cargo:rustc-env=HELEXA_GIT_SHA={sha}");
    let features = features_from(std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()));
    println!("cargo:rustc-env=HELEXA_FEATURES={}", features.join(","));
    let candle = match find_lock(&manifest) {
        Some(lock) => {
            println!("cargo:rerun-if-changed={}", lock.display());
            std::fs::read_to_string(&lock)
                .ok()
                .and_then(|text| locked_version(&text, "candle-core"))
                .unwrap_or_else(|| "unknown".to_string())
        }
        None => "unknown".to_string(),
    };
    println!("cargo:rustc-env=HELEXA_CANDLE_VERSION={candle}");
}

/// `git rev-parse --short=12 HEAD` in `dir`, if git and a repository are there.
pub fn git_sha(dir: &Path) -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(dir)
        .output()
        .ok()?;
    let sha = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !sha.is_empty()).then_some(sha)
}

/// The files whose change means a new commit: `HEAD`, the branch it points
/// to (loose and packed). Only existing files: cargo reruns a build script
/// every time when a watched file is missing.
pub fn git_watch_paths(dir: &Path) -> Vec<PathBuf> {
    let git_path = |p: &str| -> Option<PathBuf> {
        let out = Command::new("git")
            .args(["rev-parse", "--path-format=absolute", "--git-path", p])
            .current_dir(dir)
            .output()
            .ok()?;
        let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !s.is_empty()).then(|| PathBuf::from(s))
    };
    let mut paths = Vec::new();
    if let Some(head) = git_path("HEAD") {
        if let Ok(text) = std::fs::read_to_string(&head) {
            if let Some(branch) = text.trim().strip_prefix("ref:") {
                paths.extend(git_path(branch.trim()));
            }
        }
        paths.push(head);
    }
    paths.extend(git_path("packed-refs"));
    paths.retain(|p| p.exists());
    paths
}

/// Enabled features from the `CARGO_FEATURE_<NAME>` variables cargo sets for
/// build scripts: lower case, `_` back to `-`, sorted; `default` left out.
pub fn features_from(vars: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut features: Vec<String> = vars
        .into_iter()
        .filter_map(|k| {
            k.strip_prefix("CARGO_FEATURE_")
                .map(|f| f.to_ascii_lowercase().replace('_', "-"))
        })
        .filter(|f| f != "default")
        .collect();
    features.sort();
    features.dedup();
    features
}

/// The nearest `Cargo.lock` at or above `dir` (the workspace's).
pub fn find_lock(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .map(|d| d.join("Cargo.lock"))
        .find(|p| p.is_file())
}

/// The version of package `name` in a `Cargo.lock` text (the first entry).
pub fn locked_version(lock: &str, name: &str) -> Option<String> {
    let wanted = format!("name = \"{name}\"");
    let mut lines = lock.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if line == wanted {
            let version = lines.next()?.strip_prefix("version = \"")?;
            return version.strip_suffix('"').map(String::from);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_version_is_found() {
        let lock = "[[package]]\nname = \"candle-core-x\"\nversion = \"9\"\n\n[[package]]\nname = \"candle-core\"\nversion = \"0.11.1\"\nsource = \"registry\"\n";
        assert_eq!(
            locked_version(lock, "candle-core").as_deref(),
            Some("0.11.1")
        );
        assert_eq!(locked_version(lock, "absent"), None);
        // The workspace's own lock has candle.
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(find_lock(here).unwrap()).unwrap();
        assert!(locked_version(&text, "candle-core").is_some());
    }

    #[test]
    fn features_come_from_cargo_variables() {
        let vars = [
            "CARGO_FEATURE_CUDA",
            "CARGO_FEATURE_DEFAULT",
            "CARGO_FEATURE_FLASH_ATTN",
            "CARGO_PKG_NAME",
        ]
        .map(String::from);
        assert_eq!(features_from(vars), vec!["cuda", "flash-attn"]);
    }
}
