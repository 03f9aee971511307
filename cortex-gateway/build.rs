//! Build-time facts for `GET /version`: the git commit (`HELEXA_GIT_SHA`
//! from the environment, for builds without `.git` such as RPMs; else
//! `git rev-parse`), the enabled features and candle's locked version.

#[path = "../crates/helexa-api/src/version_build.rs"]
mod version_build;

fn main() {
    version_build::emit();
}
