//! `GET /version` (docs/protocol.md §8): the name, version, git commit,
//! cargo features and candle version of this build (see `build.rs`).

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VersionInfo {
    pub name: &'static str,
    pub version: &'static str,
    pub git_sha: &'static str,
    pub features: Vec<&'static str>,
    pub candle: &'static str,
}

/// This build's facts.
pub fn info() -> VersionInfo {
    VersionInfo {
        name: "cortex",
        version: env!("CARGO_PKG_VERSION"),
        git_sha: env!("HELEXA_GIT_SHA"),
        features: Vec::new(),
        candle: env!("HELEXA_CANDLE_VERSION"),
    }
}
