//! Chat templates rendered with minijinja, read from `chat_template.jinja`,
//! `chat_template.json` or `tokenizer_config.json`, as transformers does. Transformers'
//! `{% generation %}` block tag (used by LLaVA-1.5's template to mark assistant text) is
//! accepted and rendered as a plain block.

use std::path::Path;

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One part of a message's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Part {
    /// An image placeholder (the pixels travel separately).
    Image {},
    /// Text.
    Text { text: String },
}

/// A chat message in the Hugging Face `messages` format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Vec<Part>,
}

impl Message {
    /// A text-only message.
    pub fn text(role: &str, text: &str) -> Self {
        Message {
            role: role.to_string(),
            content: vec![Part::Text {
                text: text.to_string(),
            }],
        }
    }
    /// A user message with one image followed by text.
    pub fn user_with_image(text: &str) -> Self {
        Message {
            role: "user".into(),
            content: vec![
                Part::Image {},
                Part::Text {
                    text: text.to_string(),
                },
            ],
        }
    }
    /// Number of image parts.
    pub fn n_images(&self) -> usize {
        self.content
            .iter()
            .filter(|p| matches!(p, Part::Image {}))
            .count()
    }
    /// The text parts joined by a space.
    pub fn joined_text(&self) -> String {
        self.content
            .iter()
            .filter_map(|p| match p {
                Part::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Parse a conversation: a JSON list of messages, or an object with a `messages` list (the
/// fixtures' files). Content may be a string (one text part) or a list of parts.
pub fn parse_messages(text: &str, origin: &Path) -> Result<Vec<Message>> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::config(origin, format!("not valid JSON: {e}")))?;
    let list = match &v {
        serde_json::Value::Array(_) => v.clone(),
        serde_json::Value::Object(o) => o.get("messages").cloned().ok_or_else(|| {
            Error::config(
                origin,
                "expected a list of messages or an object with 'messages'",
            )
        })?,
        _ => return Err(Error::config(origin, "expected a list of messages")),
    };
    let arr = list
        .as_array()
        .ok_or_else(|| Error::config(origin, "'messages' must be a list"))?;
    let mut out = Vec::with_capacity(arr.len());
    for (i, m) in arr.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(|r| r.as_str())
            .ok_or_else(|| Error::config(origin, format!("message {i}: missing 'role'")))?;
        if !["user", "assistant", "system"].contains(&role) {
            return Err(Error::config(
                origin,
                format!("message {i}: role '{role}' (expected user, assistant or system)"),
            ));
        }
        let content = match m.get("content") {
            Some(serde_json::Value::String(s)) => vec![Part::Text { text: s.clone() }],
            Some(c @ serde_json::Value::Array(_)) => serde_json::from_value(c.clone()).map_err(|e| {
                Error::config(
                    origin,
                    format!("message {i}: content parts must be {{\"type\": \"image\"}} or {{\"type\": \"text\", \"text\": ...}}: {e}"),
                )
            })?,
            _ => return Err(Error::config(origin, format!("message {i}: missing 'content'"))),
        };
        out.push(Message {
            role: role.to_string(),
            content,
        });
    }
    Ok(out)
}

/// A chat template with the special tokens it may refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

fn token_str(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        None => String::new(),
    }
}

impl ChatTemplate {
    /// Find the checkpoint's template: `chat_template.jinja`, then `chat_template.json`, then the
    /// `chat_template` key of `tokenizer_config.json`. `Ok(None)` when there is none.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let tc_path = dir.join("tokenizer_config.json");
        let tc = if tc_path.exists() {
            Some(crate::source::read_json(&tc_path)?)
        } else {
            None
        };
        let bos = token_str(tc.as_ref().and_then(|t| t.get("bos_token")));
        let eos = token_str(tc.as_ref().and_then(|t| t.get("eos_token")));
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.exists() {
            Some(crate::error::read_to_string(&jinja)?)
        } else if dir.join("chat_template.json").exists() {
            let p = dir.join("chat_template.json");
            let v = crate::source::read_json(&p)?;
            Some(
                v.get("chat_template")
                    .and_then(|x| x.as_str())
                    .ok_or_else(|| Error::config(&p, "expected a 'chat_template' string"))?
                    .to_string(),
            )
        } else {
            match tc.as_ref().and_then(|t| t.get("chat_template")) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|x| x.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or_else(|| list.first())
                    .and_then(|x| x.get("template"))
                    .and_then(|x| x.as_str())
                    .map(String::from),
                _ => None,
            }
        };
        Ok(source.map(|source| ChatTemplate {
            source,
            bos_token: bos,
            eos_token: eos,
        }))
    }

    /// Render `messages`; `add_generation_prompt` appends the assistant prefix.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
        let src = strip_generation_tags(&self.source);
        env.add_template("chat", &src)
            .map_err(|e| Error::msg(format!("chat template does not parse: {e}")))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::msg(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        })
        .map_err(|e| Error::msg(format!("chat template failed to render: {e}")))
    }
}

/// Replace `{% generation %}` / `{% endgeneration %}` (with any whitespace control) by a plain
/// block that renders its body unchanged.
pub fn strip_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(i) = rest.find("{%") {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let Some(j) = tail.find("%}") else {
            out.push_str(tail);
            return out;
        };
        let tag = &tail[..j + 2];
        let inner = tag[2..tag.len() - 2].trim_matches(|c: char| c == '-' || c.is_whitespace());
        let lead = if tag.starts_with("{%-") { "{%-" } else { "{%" };
        let trail = if tag.ends_with("-%}") { "-%}" } else { "%}" };
        match inner {
            "generation" => out.push_str(&format!("{lead} if true {trail}")),
            "endgeneration" => out.push_str(&format!("{lead} endif {trail}")),
            _ => out.push_str(tag),
        }
        rest = &tail[j + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags() {
        let s = strip_generation_tags("a{% generation %}b{%- endgeneration -%} c{{ x }}");
        assert_eq!(s, "a{% if true %}b{%- endif -%} c{{ x }}");
    }
}
