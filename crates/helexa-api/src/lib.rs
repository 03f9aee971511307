//! OpenAI wire types shared by every helexa process and by the tests.
//!
//! `error` is the one error envelope (docs/protocol.md §2); `extract` makes axum's
//! body rejections speak it; `sse` frames server-sent events; `shutdown` waits
//! for SIGTERM/SIGINT; `version` is the `/version` body and `version_build`
//! the build-script half that fills it in; the rest are the request and
//! response shapes of the OpenAI API that helexa serves.

pub mod chat;
pub mod completions;
pub mod embeddings;
pub mod error;
pub mod extract;
pub mod models;
pub mod shutdown;
pub mod sse;
pub mod version;
pub mod version_build;

pub use error::{ApiError, ErrorBody, ErrorCode};
pub use extract::ApiJson;
pub use version::VersionInfo;
