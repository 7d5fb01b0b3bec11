//! The result size budget: a tool result whose text is longer than the caller's token limit
//! (`[routing] max_result_tokens`, or `_meta["concord/max_result_tokens"]` on the call) is cut
//! to fit, counted with a real tokenizer (o200k_base), and ends with a marker telling the model
//! how much was cut and how to read the rest: the built-in tool `concord__result_page` with the
//! handle the marker names. The rest is kept in memory for a while, readable only by the
//! caller it was cut for.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rmcp::model::{CallToolResult, ContentBlock};
use serde_json::json;

/// The built-in tool that reads what a truncation kept back (unprefixed name).
pub(crate) const PAGE_TOOL: &str = "result_page";
/// How long the rest of a truncated result can be read.
const KEEP_FOR: Duration = Duration::from_secs(600);
/// Truncated results kept at once; the oldest leaves first.
const MAX_KEPT: usize = 256;

pub(crate) fn count_tokens(text: &str) -> usize {
    tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(text)
        .len()
}

/// The longest prefix of `text` of at most `max_tokens` tokens, cut on a character boundary.
fn prefix_within(text: &str, max_tokens: usize) -> &str {
    let bpe = tiktoken_rs::o200k_base_singleton();
    let tokens = bpe.encode_ordinary(text);
    if tokens.len() <= max_tokens {
        return text;
    }
    let mut end = bpe
        .decode_bytes(&tokens[..max_tokens])
        .map(|bytes| bytes.len())
        .unwrap_or(0)
        .min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

struct Kept {
    owner: String,
    rest: String,
    max_tokens: usize,
    stored: Instant,
}

/// The parts of truncated results not yet read, by handle.
#[derive(Default)]
pub(crate) struct Remainders {
    kept: Mutex<HashMap<String, Kept>>,
}

/// What one truncation did.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Truncation {
    pub total_tokens: usize,
    pub kept_tokens: usize,
    pub handle: String,
}

impl Remainders {
    fn keep(&self, owner: &str, rest: String, max_tokens: usize) -> String {
        let handle = uuid::Uuid::new_v4().simple().to_string();
        let mut kept = self.kept.lock();
        let now = Instant::now();
        kept.retain(|_, k| now.duration_since(k.stored) < KEEP_FOR);
        if kept.len() >= MAX_KEPT
            && let Some(oldest) = kept
                .iter()
                .min_by_key(|(_, k)| k.stored)
                .map(|(h, _)| h.clone())
        {
            kept.remove(&oldest);
        }
        kept.insert(
            handle.clone(),
            Kept {
                owner: owner.to_string(),
                rest,
                max_tokens,
                stored: now,
            },
        );
        handle
    }

    /// Cuts `result` to `max_tokens` tokens of text if it is longer, keeping the rest for
    /// `owner` under a handle the appended marker names. Non-text content after the cut is
    /// dropped, and so is `structuredContent` (it repeats the text, which no longer fits)
    /// unless `schema_bound`: a tool with an output schema must return it, so it stays whole.
    pub fn limit(
        &self,
        result: &mut CallToolResult,
        max_tokens: usize,
        owner: &str,
        page_tool: Option<&str>,
        schema_bound: bool,
    ) -> Option<Truncation> {
        let counts: Vec<usize> = result
            .content
            .iter()
            .map(|block| block.as_text().map_or(0, |text| count_tokens(&text.text)))
            .collect();
        let total_tokens: usize = counts.iter().sum();
        if total_tokens <= max_tokens {
            return None;
        }
        let mut budget = max_tokens;
        let mut kept_blocks = Vec::new();
        let mut rest: Vec<String> = Vec::new();
        let mut dropped_other = 0usize;
        let mut cut = false;
        let mut kept_tokens = 0usize;
        for (block, tokens) in std::mem::take(&mut result.content).into_iter().zip(counts) {
            let Some(text) = block.as_text() else {
                if cut {
                    dropped_other += 1;
                } else {
                    kept_blocks.push(block);
                }
                continue;
            };
            if cut {
                rest.push(text.text.clone());
                continue;
            }
            if tokens <= budget {
                budget -= tokens;
                kept_tokens += tokens;
                kept_blocks.push(block);
                continue;
            }
            cut = true;
            let head = prefix_within(&text.text, budget);
            let tail = text.text[head.len()..].to_string();
            kept_tokens += count_tokens(head);
            if !head.is_empty() {
                kept_blocks.push(ContentBlock::text(head.to_string()));
            }
            rest.push(tail);
        }
        let handle = self.keep(owner, rest.join("\n\n"), max_tokens);
        let how = match page_tool {
            Some(tool) => {
                format!("To read the rest, call the tool {tool} with {{\"handle\": \"{handle}\"}}.")
            }
            None => {
                "Ask with a larger limit (_meta concord/max_result_tokens) to see more.".to_string()
            }
        };
        let mut marker = format!(
            "[concord: result truncated to fit {max_tokens} tokens: {} of {total_tokens} tokens cut.",
            total_tokens.saturating_sub(kept_tokens)
        );
        if dropped_other > 0 {
            marker.push_str(&format!(" {dropped_other} non-text item(s) omitted."));
        }
        if !schema_bound && result.structured_content.take().is_some() {
            marker.push_str(" structuredContent omitted.");
        }
        marker.push(' ');
        marker.push_str(&how);
        marker.push(']');
        kept_blocks.push(ContentBlock::text(marker));
        result.content = kept_blocks;
        let meta = result.meta.get_or_insert_with(Default::default);
        meta.0.insert(
            "concord/truncated".into(),
            json!({"totalTokens": total_tokens, "keptTokens": kept_tokens, "handle": handle}),
        );
        Some(Truncation {
            total_tokens,
            kept_tokens,
            handle,
        })
    }

    /// The next page of a truncated result for `owner`: up to `max_tokens` (default: the limit
    /// of the truncation) tokens, with a marker naming the same handle while more remains.
    pub fn page(
        &self,
        handle: &str,
        owner: &str,
        max_tokens: Option<usize>,
        page_tool: &str,
    ) -> Result<CallToolResult, String> {
        let mut kept = self.kept.lock();
        let unknown = || format!("unknown or expired handle {handle:?}");
        let entry = kept.get_mut(handle).ok_or_else(unknown)?;
        if entry.owner != owner || entry.stored.elapsed() >= KEEP_FOR {
            // Someone else's handle reads exactly like one that does not exist.
            return Err(unknown());
        }
        let limit = max_tokens.unwrap_or(entry.max_tokens).max(1);
        let head = prefix_within(&entry.rest, limit).to_string();
        let remaining = entry.rest[head.len()..].to_string();
        if remaining.is_empty() {
            kept.remove(handle);
            return Ok(CallToolResult::success(vec![ContentBlock::text(head)]));
        }
        let left = count_tokens(&remaining);
        entry.rest = remaining;
        entry.stored = Instant::now();
        Ok(CallToolResult::success(vec![
            ContentBlock::text(head),
            ContentBlock::text(format!(
                "[concord: {left} more tokens. To read on, call the tool {page_tool} with {{\"handle\": \"{handle}\"}}.]"
            )),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(result: &CallToolResult) -> Vec<String> {
        result
            .content
            .iter()
            .filter_map(|b| b.as_text().map(|t| t.text.clone()))
            .collect()
    }

    #[test]
    fn short_results_are_untouched() {
        let remainders = Remainders::default();
        let mut result = CallToolResult::success(vec![ContentBlock::text("hello world")]);
        let before = result.clone();
        assert_eq!(
            remainders.limit(&mut result, 10, "alice", None, false),
            None
        );
        assert_eq!(result, before);
    }

    #[test]
    fn a_long_result_is_cut_marked_and_readable_in_pages_by_its_owner_only() {
        let remainders = Remainders::default();
        let words: Vec<String> = (0..400).map(|i| format!("word{i}")).collect();
        let long = words.join(" ");
        let total = count_tokens(&long);
        assert!(total > 100, "{total}");
        let mut result = CallToolResult::success(vec![ContentBlock::text(long.clone())]);
        let cut = remainders
            .limit(
                &mut result,
                100,
                "alice",
                Some("concord__result_page"),
                false,
            )
            .expect("truncated");
        assert_eq!(cut.total_tokens, total);
        let texts = text_of(&result);
        assert_eq!(texts.len(), 2);
        assert!(count_tokens(&texts[0]) <= 100, "{}", texts[0]);
        assert!(long.starts_with(&texts[0]));
        assert!(
            texts[1].contains(&format!("of {total} tokens cut"))
                && texts[1].contains("concord__result_page")
                && texts[1].contains(&cut.handle),
            "{}",
            texts[1]
        );
        assert_eq!(
            result.meta.as_ref().unwrap().0["concord/truncated"]["handle"],
            json!(cut.handle)
        );

        // Another caller cannot read it.
        let refused = remainders
            .page(&cut.handle, "bob", None, "concord__result_page")
            .unwrap_err();
        assert!(refused.contains("unknown or expired handle"), "{refused}");

        // The owner reads the rest, page by page, and it joins up to the original.
        let mut read = texts[0].clone();
        for _ in 0..100 {
            let page = remainders
                .page(&cut.handle, "alice", Some(120), "concord__result_page")
                .unwrap();
            let parts = text_of(&page);
            assert!(count_tokens(&parts[0]) <= 120);
            read.push_str(&parts[0]);
            if parts.len() == 1 {
                break;
            }
            assert!(parts[1].contains("more tokens"), "{}", parts[1]);
        }
        assert_eq!(read, long);
        assert!(
            remainders
                .page(&cut.handle, "alice", None, "concord__result_page")
                .is_err(),
            "a fully read handle is gone"
        );
    }

    #[test]
    fn cuts_respect_character_boundaries_and_drop_structured_content() {
        let remainders = Remainders::default();
        let text = "né ü 日本語 ".repeat(200);
        let mut result = CallToolResult::structured(json!({"big": text.clone()}));
        result.content = vec![ContentBlock::text(text.clone())];
        let mut bound = result.clone();
        remainders
            .limit(&mut result, 50, "alice", None, false)
            .expect("cut");
        let texts = text_of(&result);
        assert!(text.starts_with(&texts[0]));
        assert!(result.structured_content.is_none());
        assert!(
            texts[1].contains("structuredContent omitted"),
            "{}",
            texts[1]
        );
        assert!(texts[1].contains("larger limit"), "{}", texts[1]);
        // A tool with an output schema must return its structured content: it stays.
        remainders
            .limit(&mut bound, 50, "alice", None, true)
            .expect("cut");
        assert!(bound.structured_content.is_some());
        assert!(!text_of(&bound)[1].contains("structuredContent omitted"));
    }
}
