//! A model's own sampling defaults: what its publisher says it should be
//! sampled with, used for every field a request leaves out.
//!
//! Sources, later ones winning field by field: the GGUF's `general.sampling.*`
//! metadata (written by llama.cpp's converter), then a `generation_config.json`
//! (Hugging Face's file: beside a GGUF as `<stem>.generation_config.json` or
//! `generation_config.json`, or in a safetensors model directory). Its
//! `eos_token_id` (a number or a list) adds end-of-generation tokens.
//! `do_sample` is not read: like vLLM, we take the sampling values as the
//! publisher's recommendation whatever `do_sample` says.

use candle_core::quantized::gguf_file::Value as GgufValue;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// End-of-generation token ids besides the tokenizer's EOS.
    pub eos_token_ids: Vec<u32>,
    /// Where the values came from (for logs and `/v1/models`).
    pub source: Option<String>,
}

fn finite(v: Option<f64>, lo: f64, hi: f64) -> Option<f32> {
    v.filter(|x| x.is_finite() && *x >= lo && *x <= hi)
        .map(|x| x as f32)
}

impl GenerationDefaults {
    /// From a `generation_config.json` value. Out-of-range values are
    /// ignored (with the request's own range checks, they could never be
    /// sent by a client either).
    pub fn from_json(v: &Value) -> GenerationDefaults {
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        let eos = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().into_iter().collect(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).collect(),
            _ => Vec::new(),
        };
        GenerationDefaults {
            temperature: finite(f("temperature"), 0.0, 2.0),
            top_p: finite(f("top_p"), 0.0, 1.0).filter(|p| *p > 0.0),
            top_k: v
                .get("top_k")
                .and_then(Value::as_u64)
                .and_then(|k| usize::try_from(k).ok()),
            min_p: finite(f("min_p"), 0.0, 1.0),
            repetition_penalty: finite(f("repetition_penalty"), 0.01, 10.0),
            eos_token_ids: eos
                .into_iter()
                .filter_map(|x| u32::try_from(x).ok())
                .collect(),
            source: Some("generation_config.json".into()),
        }
    }

    /// From GGUF metadata (`general.sampling.*`).
    pub fn from_gguf(md: &HashMap<String, GgufValue>) -> GenerationDefaults {
        let f = |k: &str| {
            md.get(k)
                .and_then(|v| v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok()))
        };
        let d = GenerationDefaults {
            temperature: finite(f("general.sampling.temp"), 0.0, 2.0),
            top_p: finite(f("general.sampling.top_p"), 0.0, 1.0).filter(|p| *p > 0.0),
            top_k: md
                .get("general.sampling.top_k")
                .and_then(|v| {
                    v.to_i32()
                        .ok()
                        .or_else(|| v.to_u32().ok().map(|u| u as i32))
                })
                .and_then(|k| usize::try_from(k).ok()),
            min_p: finite(f("general.sampling.min_p"), 0.0, 1.0),
            repetition_penalty: finite(f("general.sampling.penalty_repeat"), 0.01, 10.0),
            eos_token_ids: Vec::new(),
            source: None,
        };
        if d.is_empty() {
            d
        } else {
            GenerationDefaults {
                source: Some("gguf metadata".into()),
                ..d
            }
        }
    }

    /// Reads a `generation_config.json`; `Ok(None)` when there is none.
    pub fn read(path: &Path) -> Result<Option<GenerationDefaults>, String> {
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
        Ok(Some(GenerationDefaults::from_json(&v)))
    }

    fn is_empty(&self) -> bool {
        self.temperature.is_none()
            && self.top_p.is_none()
            && self.top_k.is_none()
            && self.min_p.is_none()
            && self.repetition_penalty.is_none()
            && self.eos_token_ids.is_empty()
    }

    /// `self`, with each field `over` sets replacing it.
    pub fn overridden_by(self, over: GenerationDefaults) -> GenerationDefaults {
        let mut eos = self.eos_token_ids;
        for id in over.eos_token_ids {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        let source = match (self.source, over.source) {
            (Some(a), Some(b)) => Some(format!("{a}, {b}")),
            (a, b) => a.or(b),
        };
        GenerationDefaults {
            temperature: over.temperature.or(self.temperature),
            top_p: over.top_p.or(self.top_p),
            top_k: over.top_k.or(self.top_k),
            min_p: over.min_p.or(self.min_p),
            repetition_penalty: over.repetition_penalty.or(self.repetition_penalty),
            eos_token_ids: eos,
            source,
        }
    }

    /// The defaults as shown in `/v1/models` (only those the model sets).
    pub fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        };
        // f32 → f64 would show 0.9 as 0.8999999761581421.
        let r = |x: f32| json!((f64::from(x) * 1e6).round() / 1e6);
        put("temperature", self.temperature.map(r));
        put("top_p", self.top_p.map(r));
        put("top_k", self.top_k.map(|x| json!(x)));
        put("min_p", self.min_p.map(r));
        put("repetition_penalty", self.repetition_penalty.map(r));
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_config_fields_ranges_and_eos() {
        let d = GenerationDefaults::from_json(&json!({
            "temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0,
            "repetition_penalty": 1.05, "eos_token_id": [151645, 151643], "do_sample": true
        }));
        assert_eq!(d.temperature, Some(0.6));
        assert_eq!(d.top_p, Some(0.95));
        assert_eq!(d.top_k, Some(20));
        assert_eq!(d.min_p, Some(0.0));
        assert_eq!(d.repetition_penalty, Some(1.05));
        assert_eq!(d.eos_token_ids, vec![151645, 151643]);
        let one = GenerationDefaults::from_json(
            &json!({"eos_token_id": 2, "temperature": 7.0, "top_p": 0}),
        );
        assert_eq!(one.eos_token_ids, vec![2]);
        assert_eq!(one.temperature, None, "out of range is ignored");
        assert_eq!(one.top_p, None, "top_p 0 is ignored");
    }

    #[test]
    fn later_sources_win_field_by_field() {
        let gguf = GenerationDefaults {
            temperature: Some(0.8),
            top_k: Some(40),
            source: Some("gguf metadata".into()),
            ..Default::default()
        };
        let file = GenerationDefaults::from_json(&json!({"temperature": 0.6, "eos_token_id": 5}));
        let d = gguf.overridden_by(file);
        assert_eq!(d.temperature, Some(0.6));
        assert_eq!(d.top_k, Some(40));
        assert_eq!(d.eos_token_ids, vec![5]);
        assert_eq!(d.to_json(), json!({"temperature": 0.6, "top_k": 40}));
    }
}
