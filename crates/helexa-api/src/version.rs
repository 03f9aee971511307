//! `GET /version` (docs/protocol.md §8): what build of a helexa process answers.
//!
//! The body is the same for cortex and neuron, so its type lives here. The
//! values are fixed at build time by the binary's `build.rs` (which includes
//! `version_build.rs`, std-only, so a build script needs no dependency) and
//! read with [`version_info!`] in the binary's own crate, where `env!` sees
//! the variables that build script set.

use serde::{Deserialize, Serialize};

/// The `/version` body: `{"name", "version", "git_sha", "features",
/// "candle"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The process: `neuron` or `cortex`.
    pub name: String,
    /// The crate version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// The commit it was built from (12 hex digits), or `unknown`.
    pub git_sha: String,
    /// The cargo features the binary was built with, e.g. `["cuda"]`.
    pub features: Vec<String>,
    /// The candle-core version in the workspace's `Cargo.lock`, or `unknown`.
    pub candle: String,
}

impl VersionInfo {
    /// Builds the body from the strings a build script emitted;
    /// `features` is comma-separated (empty: none).
    pub fn new(name: &str, version: &str, git_sha: &str, features: &str, candle: &str) -> Self {
        VersionInfo {
            name: name.to_string(),
            version: version.to_string(),
            git_sha: git_sha.to_string(),
            features: features
                .split(',')
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .map(String::from)
                .collect(),
            candle: candle.to_string(),
        }
    }
}

/// The [`VersionInfo`] of the crate this is expanded in. That crate's
/// `build.rs` must call `version_build::emit()` (see `version_build.rs`),
/// which sets `HELEXA_GIT_SHA`, `HELEXA_FEATURES` and `HELEXA_CANDLE_VERSION`.
#[macro_export]
macro_rules! version_info {
    ($name:expr) => {
        $crate::version::VersionInfo::new(
            $name,
            env!("CARGO_PKG_VERSION"),
            env!("HELEXA_GIT_SHA"),
            env!("HELEXA_FEATURES"),
            env!("HELEXA_CANDLE_VERSION"),
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_split_and_serialise() {
        let v = VersionInfo::new("neuron", "0.1.0", "abc", "cuda, ,flash", "0.11.1");
        assert_eq!(v.features, vec!["cuda", "flash"]);
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"name": "neuron", "version": "0.1.0", "git_sha": "abc",
                "features": ["cuda", "flash"], "candle": "0.11.1"})
        );
        assert!(VersionInfo::new("cortex", "1", "unknown", "", "unknown")
            .features
            .is_empty());
    }
}
