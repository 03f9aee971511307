//! `response_format` → the grammar the output must follow: `text` (none),
//! `json_object` (any JSON object), `json_schema` (valid under the schema).
//! The grammar is compiled here, per request, so that an unsupported schema
//! feature is a 400 naming it before anything is generated.

use helexa_api::ApiError;
use helexa_engine::{Constraint, Engine, Grammar};
use serde_json::Value;

/// The grammar `response_format` asks for, checked for shape.
pub fn grammar(format: Option<&Value>) -> Result<Option<Grammar>, ApiError> {
    let Some(format) = format.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let bad = |msg: String, param: &str| ApiError::invalid_request(msg, param);
    let kind = format.get("type").and_then(Value::as_str).ok_or_else(|| {
        bad(
            "`response_format` must be an object with a `type`".into(),
            "response_format",
        )
    })?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(Grammar::json_object())),
        "json_schema" => {
            let spec = format.get("json_schema").ok_or_else(|| {
                bad(
                    "`response_format.json_schema` is required when `type` is `json_schema`"
                        .into(),
                    "response_format.json_schema",
                )
            })?;
            if !spec.get("name").is_some_and(Value::is_string) {
                return Err(bad(
                    "`response_format.json_schema.name` must be a string".into(),
                    "response_format.json_schema.name",
                ));
            }
            if spec.get("strict").is_some_and(|s| !s.is_boolean() && !s.is_null()) {
                return Err(bad(
                    "`response_format.json_schema.strict` must be a boolean".into(),
                    "response_format.json_schema.strict",
                ));
            }
            // Strict or not, the output is generated under the schema.
            let schema = match spec.get("schema") {
                None | Some(Value::Null) => serde_json::json!({}),
                Some(s @ (Value::Object(_) | Value::Bool(true))) => s.clone(),
                Some(_) => {
                    return Err(bad(
                        "`response_format.json_schema.schema` must be a JSON Schema object".into(),
                        "response_format.json_schema.schema",
                    ))
                }
            };
            Ok(Some(Grammar::JsonSchema(schema)))
        }
        other => Err(bad(
            format!(
                "`response_format.type` must be `text`, `json_object` or `json_schema`, got {other:?}"
            ),
            "response_format.type",
        )),
    }
}

/// Compiles a grammar off the runtime; a refusal names `param`.
pub async fn compile(
    engine: &Engine,
    grammar: Grammar,
    param: &'static str,
) -> Result<Constraint, ApiError> {
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || engine.compile_grammar(&grammar))
        .await
        .map_err(|e| ApiError::new(helexa_api::ErrorCode::InternalError, e.to_string()))?
        .map_err(|e| {
            let msg = match e {
                helexa_engine::EngineError::InvalidRequest(m) => m,
                other => other.to_string(),
            };
            ApiError::invalid_request(format!("`{param}` cannot be used: {msg}"), param)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shapes() {
        assert_eq!(grammar(None).unwrap(), None);
        assert_eq!(grammar(Some(&json!({"type": "text"}))).unwrap(), None);
        assert_eq!(
            grammar(Some(&json!({"type": "json_object"}))).unwrap(),
            Some(Grammar::json_object())
        );
        let s = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            grammar(Some(
                &json!({"type": "json_schema", "json_schema": {"name": "x", "schema": s, "strict": true}})
            ))
            .unwrap(),
            Some(Grammar::JsonSchema(s))
        );
        for (bad, param) in [
            (json!("json"), "response_format"),
            (json!({"type": "yaml"}), "response_format.type"),
            (
                json!({"type": "json_schema"}),
                "response_format.json_schema",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"schema": {}}}),
                "response_format.json_schema.name",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}),
                "response_format.json_schema.schema",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}}),
                "response_format.json_schema.strict",
            ),
        ] {
            assert_eq!(
                grammar(Some(&bad)).unwrap_err().param.as_deref(),
                Some(param),
                "{bad}"
            );
        }
    }
}
