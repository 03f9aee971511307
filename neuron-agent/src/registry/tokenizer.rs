//! The tokenizer cache: each model's `tokenizer.json`, fetched once from
//! its engine after load and kept for `GET /models/{id}/tokenizer`.

use super::{Registry, Slot};
use crate::supervisor::EngineConn;
use bytes::Bytes;
use helexa_api::{ApiError, ErrorCode};
use std::time::Duration;

impl Registry {
    pub(crate) async fn fetch_tokenizer(&self, slot: &Slot, conn: &EngineConn) -> Option<Bytes> {
        let resp = self
            .inner
            .client
            .get(format!("{}/tokenizer", conn.base_url))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let bytes = resp.bytes().await.ok()?;
        *slot.tokenizer.lock().expect("tokenizer lock") = Some(bytes.clone());
        Some(bytes)
    }

    /// The model's `tokenizer.json`, from cache or fetched from its engine.
    pub async fn tokenizer(&self, id: &str) -> Result<Bytes, ApiError> {
        let slot = self.slot(id).ok_or_else(|| ApiError::model_not_found(id))?;
        if let Some(b) = slot.tokenizer.lock().expect("tokenizer lock").clone() {
            return Ok(b);
        }
        let engine = self.current_engine(id).map_err(|_| {
            ApiError::new(
                ErrorCode::ModelNotFound,
                format!("The model `{id}` is not loaded on this node"),
            )
            .with_param("model")
        })?;
        self.fetch_tokenizer(slot, &engine).await.ok_or_else(|| {
            ApiError::new(
                ErrorCode::ModelNotFound,
                format!("The engine of `{id}` provides no tokenizer"),
            )
            .with_param("model")
        })
    }
}
