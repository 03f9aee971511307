//! Advisory `x-helexa-advice` header for known clients on context refusals.
//!
//! Fingerprinted from `User-Agent` only; it is a header, never part of the
//! body, and never changes what cortex does.

pub const HEADER: &str = "x-helexa-advice";

/// Advice for a client that sent an over-long prompt, if we recognise it.
pub fn for_context_refusal(user_agent: Option<&str>, max: u64) -> Option<String> {
    let ua = user_agent?.to_ascii_lowercase();
    let text = if ua.contains("litellm") {
        format!("litellm: set max_input_tokens={max} for this model in model_info so the router trims or falls back before sending")
    } else if ua.contains("agent-zero") || ua.contains("agent_zero") || ua.contains("agentzero") {
        format!("Agent-Zero: set the chat model ctx_length to {max} or lower so history is summarised before it overflows")
    } else if ua.starts_with("zed") || ua.contains(" zed/") {
        format!("Zed: set max_tokens={max} for this model under language_models.openai_compatible in settings.json")
    } else {
        return None;
    };
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints() {
        assert!(for_context_refusal(Some("litellm/1.50.0"), 10)
            .unwrap()
            .contains("max_input_tokens=10"));
        assert!(for_context_refusal(Some("Zed/0.170.0 (linux)"), 10)
            .unwrap()
            .starts_with("Zed"));
        assert!(for_context_refusal(Some("Agent-Zero"), 10).is_some());
        assert!(for_context_refusal(Some("curl/8.0"), 10).is_none());
        assert!(for_context_refusal(None, 10).is_none());
    }
}
