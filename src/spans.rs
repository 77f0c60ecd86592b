//! Span tables: where each message, each image and the decision position sit in a prepared
//! token sequence.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One chat message's token range `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageSpan {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Index of the message in the conversation.
    pub index: usize,
    pub start: usize,
    pub end: usize,
}

/// One image's placeholder tokens `[start, end)`, laid out as `rows x cols` patches (row-major)
/// after any merge the model does. For Q-Former families the span holds the query tokens and
/// `rows x cols` describes the vision patch grid the queries look at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSpan {
    pub index: usize,
    pub start: usize,
    pub end: usize,
    pub rows: usize,
    pub cols: usize,
}

impl ImageSpan {
    /// Number of tokens in the span.
    pub fn len(&self) -> usize {
        self.end - self.start
    }
    /// True when the span holds no token.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// The span table of one prepared sequence (positions are for the unpadded sequence; batching
/// shifts them by the row's left padding, see [`Spans::shifted`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spans {
    /// Sequence length (padding included).
    pub len: usize,
    /// Left padding in front of the sequence (0 unless batched).
    #[serde(default)]
    pub pad: usize,
    pub messages: Vec<MessageSpan>,
    pub images: Vec<ImageSpan>,
}

impl Spans {
    /// The decision position: the last token, where the next answer is read.
    pub fn last(&self) -> usize {
        self.len.saturating_sub(1)
    }

    /// The same table shifted right by `pad` positions (left padding in a batch).
    pub fn shifted(&self, pad: usize) -> Spans {
        Spans {
            len: self.len + pad,
            pad: self.pad + pad,
            messages: self
                .messages
                .iter()
                .map(|m| MessageSpan {
                    start: m.start + pad,
                    end: m.end + pad,
                    ..m.clone()
                })
                .collect(),
            images: self
                .images
                .iter()
                .map(|s| ImageSpan {
                    start: s.start + pad,
                    end: s.end + pad,
                    ..s.clone()
                })
                .collect(),
        }
    }

    /// Resolve a named span to `[start, end)`. Names: `image` (first image), `image{k}`,
    /// `message{k}`, `last_user` / `pressure` (the last user message, where the protocol puts the
    /// user's pushback), `first_user`, `system`, `last` / `decision` (the last token), `first`
    /// (the first token, the usual attention sink), `all`, `text` is not a contiguous span and is
    /// not accepted here.
    pub fn range(&self, name: &str) -> Result<(usize, usize)> {
        let err = || {
            Error::input(format!(
                "unknown span '{name}': expected one of image, image<k>, message<k>, last_user, pressure, first_user, system, last, decision, first, all (this input has {} messages and {} images)",
                self.messages.len(),
                self.images.len()
            ))
        };
        match name {
            "all" => Ok((self.pad, self.len)),
            "last" | "decision" => Ok((self.last(), self.len)),
            "first" => Ok((self.pad, (self.pad + 1).min(self.len))),
            "image" => self
                .images
                .first()
                .map(|s| (s.start, s.end))
                .ok_or_else(err),
            "last_user" | "pressure" => self
                .messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map(|m| (m.start, m.end))
                .ok_or_else(err),
            "first_user" => self
                .messages
                .iter()
                .find(|m| m.role == "user")
                .map(|m| (m.start, m.end))
                .ok_or_else(err),
            "system" => self
                .messages
                .iter()
                .find(|m| m.role == "system")
                .map(|m| (m.start, m.end))
                .ok_or_else(err),
            _ => {
                if let Some(k) = name
                    .strip_prefix("image")
                    .and_then(|k| k.parse::<usize>().ok())
                {
                    self.images.get(k).map(|s| (s.start, s.end)).ok_or_else(err)
                } else if let Some(k) = name
                    .strip_prefix("message")
                    .and_then(|k| k.parse::<usize>().ok())
                {
                    self.messages
                        .get(k)
                        .map(|s| (s.start, s.end))
                        .ok_or_else(err)
                } else {
                    Err(err())
                }
            }
        }
    }

    /// True when position `p` is an image token.
    pub fn is_image(&self, p: usize) -> bool {
        self.images.iter().any(|s| p >= s.start && p < s.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Spans {
        Spans {
            len: 20,
            pad: 0,
            messages: vec![
                MessageSpan {
                    role: "user".into(),
                    index: 0,
                    start: 1,
                    end: 12,
                },
                MessageSpan {
                    role: "assistant".into(),
                    index: 1,
                    start: 12,
                    end: 14,
                },
                MessageSpan {
                    role: "user".into(),
                    index: 2,
                    start: 14,
                    end: 18,
                },
            ],
            images: vec![ImageSpan {
                index: 0,
                start: 3,
                end: 7,
                rows: 2,
                cols: 2,
            }],
        }
    }

    #[test]
    fn names_resolve() {
        let s = table();
        assert_eq!(s.range("image").unwrap(), (3, 7));
        assert_eq!(s.range("pressure").unwrap(), (14, 18));
        assert_eq!(s.range("first_user").unwrap(), (1, 12));
        assert_eq!(s.range("last").unwrap(), (19, 20));
        assert_eq!(s.range("message1").unwrap(), (12, 14));
        assert!(s.range("image3").is_err());
        assert!(s.range("bogus").is_err());
        let t = s.shifted(5);
        assert_eq!(t.range("image").unwrap(), (8, 12));
        assert_eq!(t.last(), 24);
        assert!(t.is_image(8) && !t.is_image(12));
    }
}
