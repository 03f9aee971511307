//! How token states become one sentence vector: the pooling mode and the
//! normalisation a sentence-transformers model folder declares
//! (`modules.json`, `<pooling path>/config.json`), applied to a padded batch.
//!
//! Read from the folder rather than assumed, because the same BERT weights
//! give different (and wrong) vectors under another pooling: all-MiniLM-L6-v2
//! is mean-pooled and normalised, many retrieval models take the CLS token.

use candle_core::{Tensor, D};
use std::path::Path;

/// One pooling mode (sentence-transformers `pooling_mode_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    /// Mean of the unmasked tokens' states.
    Mean,
    /// The first token's state ([CLS]).
    Cls,
    /// Per dimension, the largest unmasked state.
    Max,
    /// Sum of the unmasked states over the square root of their count.
    MeanSqrtLen,
}

impl PoolingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolingMode::Mean => "mean",
            PoolingMode::Cls => "cls",
            PoolingMode::Max => "max",
            PoolingMode::MeanSqrtLen => "mean_sqrt_len",
        }
    }
}

/// What the folder says to do after the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooling {
    pub mode: PoolingMode,
    /// A `Normalize` module follows: unit-length vectors.
    pub normalize: bool,
    /// Whether the folder said so (`false`: no `modules.json` and no
    /// `1_Pooling/config.json`, the defaults were used).
    pub declared: bool,
}

impl Default for Pooling {
    /// A bare BERT folder: mean pooling, as sentence-transformers does when
    /// it wraps a plain encoder, and no normalisation.
    fn default() -> Self {
        Pooling {
            mode: PoolingMode::Mean,
            normalize: false,
            declared: false,
        }
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("cannot parse {}: {e}", path.display()))
}

/// The mode a pooling `config.json` turns on; exactly one is supported.
fn mode_of(cfg: &serde_json::Value, path: &Path) -> Result<PoolingMode, String> {
    let on = |key: &str| cfg.get(key).and_then(|v| v.as_bool()).unwrap_or(false);
    let known = [
        ("pooling_mode_mean_tokens", Some(PoolingMode::Mean)),
        ("pooling_mode_cls_token", Some(PoolingMode::Cls)),
        ("pooling_mode_max_tokens", Some(PoolingMode::Max)),
        (
            "pooling_mode_mean_sqrt_len_tokens",
            Some(PoolingMode::MeanSqrtLen),
        ),
        ("pooling_mode_weightedmean_tokens", None),
        ("pooling_mode_lasttoken", None),
    ];
    let chosen: Vec<_> = known.iter().filter(|(k, _)| on(k)).collect();
    match chosen.as_slice() {
        [] => Err(format!("{}: no pooling_mode_* is true", path.display())),
        [(_, Some(mode))] => Ok(*mode),
        [(key, None)] => Err(format!(
            "{}: {key} is not supported (mean, cls, max and mean_sqrt_len are)",
            path.display()
        )),
        several => Err(format!(
            "{}: several pooling modes at once ({}) are not supported",
            path.display(),
            several
                .iter()
                .map(|(k, _)| *k)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Reads the pooling of a model folder. A module type other than the
/// encoder, `Pooling` and `Normalize` (a `Dense` projection, say) is an
/// error: serving without it would give vectors the model never made.
pub fn read(dir: &Path) -> Result<Pooling, String> {
    let modules_path = dir.join("modules.json");
    if !modules_path.is_file() {
        let p = dir.join("1_Pooling").join("config.json");
        if p.is_file() {
            return Ok(Pooling {
                mode: mode_of(&read_json(&p)?, &p)?,
                normalize: false,
                declared: true,
            });
        }
        return Ok(Pooling::default());
    }
    let modules = read_json(&modules_path)?;
    let list = modules
        .as_array()
        .ok_or_else(|| format!("{}: not a list of modules", modules_path.display()))?;
    let mut mode = None;
    let mut normalize = false;
    for m in list {
        let kind = m.get("type").and_then(|v| v.as_str()).unwrap_or("");
        let short = kind.rsplit('.').next().unwrap_or(kind);
        match short {
            "Transformer" => {}
            "Pooling" => {
                let sub = m.get("path").and_then(|v| v.as_str()).unwrap_or("");
                let p = dir.join(sub).join("config.json");
                mode = Some(mode_of(&read_json(&p)?, &p)?);
            }
            "Normalize" => normalize = true,
            other => {
                return Err(format!(
                    "{}: module type {other:?} is not supported (only Transformer, Pooling and Normalize)",
                    modules_path.display()
                ))
            }
        }
    }
    Ok(Pooling {
        mode: mode.unwrap_or(PoolingMode::Mean),
        normalize,
        declared: true,
    })
}

impl Pooling {
    /// `states` [batch, tokens, hidden] and `mask` [batch, tokens] (1 for a
    /// real token, 0 for padding) → [batch, hidden].
    pub fn apply(&self, states: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let mask = mask.to_dtype(states.dtype())?;
        let m3 = mask.unsqueeze(D::Minus1)?;
        let pooled = match self.mode {
            PoolingMode::Cls => states.narrow(1, 0, 1)?.squeeze(1)?,
            PoolingMode::Mean | PoolingMode::MeanSqrtLen => {
                let sum = states.broadcast_mul(&m3)?.sum(1)?;
                let count = mask.sum_keepdim(1)?;
                let count = match self.mode {
                    PoolingMode::Mean => count,
                    _ => count.sqrt()?,
                };
                sum.broadcast_div(&count)?
            }
            PoolingMode::Max => {
                // Padding must never win: push it far below any state.
                let floor = ((m3.ones_like()? - &m3)? * -1e9f64)?;
                states.broadcast_add(&floor)?.max(1)?
            }
        };
        if !self.normalize {
            return Ok(pooled);
        }
        // The floor keeps an all-zero vector from dividing by zero
        // (sentence-transformers clamps the same way).
        let norm = pooled.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12f64)?;
        pooled.broadcast_div(&norm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn write(dir: &Path, name: &str, text: &str) {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn reads_modules_and_pooling_config() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(d.path()).unwrap(), Pooling::default());
        write(
            d.path(),
            "modules.json",
            r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
                {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
                {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
        );
        write(
            d.path(),
            "1_Pooling/config.json",
            r#"{"word_embedding_dimension":384,"pooling_mode_cls_token":false,"pooling_mode_mean_tokens":true}"#,
        );
        let p = read(d.path()).unwrap();
        assert_eq!(p.mode, PoolingMode::Mean);
        assert!(p.normalize && p.declared);

        write(
            d.path(),
            "1_Pooling/config.json",
            r#"{"pooling_mode_cls_token":true,"pooling_mode_mean_tokens":true}"#,
        );
        let e = read(d.path()).unwrap_err();
        assert!(e.contains("several pooling modes"), "{e}");
        write(
            d.path(),
            "1_Pooling/config.json",
            r#"{"pooling_mode_lasttoken":true}"#,
        );
        assert!(read(d.path()).unwrap_err().contains("lasttoken"));

        write(
            d.path(),
            "modules.json",
            r#"[{"path":"","type":"sentence_transformers.models.Transformer"},
                {"path":"2_Dense","type":"sentence_transformers.models.Dense"}]"#,
        );
        assert!(read(d.path()).unwrap_err().contains("\"Dense\""));
    }

    #[test]
    fn pooling_ignores_padding() {
        let dev = Device::Cpu;
        // Two sequences: [a, b] and [c, pad]; hidden size 2.
        let states =
            Tensor::new(&[[[1f32, 2.], [3., 4.]], [[5., -6.], [100., 100.]]], &dev).unwrap();
        let mask = Tensor::new(&[[1u32, 1], [1, 0]], &dev).unwrap();
        let run = |mode, normalize| {
            let p = Pooling {
                mode,
                normalize,
                declared: true,
            };
            p.apply(&states, &mask).unwrap().to_vec2::<f32>().unwrap()
        };
        assert_eq!(
            run(PoolingMode::Mean, false),
            vec![vec![2., 3.], vec![5., -6.]]
        );
        assert_eq!(
            run(PoolingMode::Cls, false),
            vec![vec![1., 2.], vec![5., -6.]]
        );
        assert_eq!(
            run(PoolingMode::Max, false),
            vec![vec![3., 4.], vec![5., -6.]]
        );
        let s = run(PoolingMode::MeanSqrtLen, false);
        assert!((s[0][0] - 4. / 2f32.sqrt()).abs() < 1e-6 && s[1] == vec![5., -6.]);
        let n = run(PoolingMode::Mean, true);
        let len = (13f32).sqrt();
        assert!((n[0][0] - 2. / len).abs() < 1e-6 && (n[0][1] - 3. / len).abs() < 1e-6);
        let len = (61f32).sqrt();
        assert!((n[1][0] - 5. / len).abs() < 1e-6);
    }
}
