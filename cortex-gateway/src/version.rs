//! `GET /version` (docs/protocol.md §8): this build's name, version, git
//! commit, cargo features and candle version (set by `build.rs`).

pub use helexa_api::version::VersionInfo;

/// This build's facts.
pub fn info() -> VersionInfo {
    helexa_api::version_info!("cortex")
}
