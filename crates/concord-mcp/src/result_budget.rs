//! The result size budget: a tool result whose text is longer than the caller's token limit
//! (`[routing] max_result_tokens`, or `_meta["concord/max_result_tokens"]` on the call) is cut
//! to fit, counted with a real tokenizer (o200k_base), and ends with a marker telling the model
//! how much was cut and how to read the rest: the built-in tool `concord__result_page` with the
//! handle the marker names. The rest is kept in memory for a while, readable only by the
//! caller it was cut for.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rmcp::model::{CallToolResult, ContentBlock};
use serde_json::json;

/// The built-in tool that reads what a truncation kept back (unprefixed name).
pub(crate) const PAGE_TOOL: &str = "result_page";
/// How long the rest of a truncated result can be read.
const KEEP_FOR: Duration = Duration::from_secs(600);
/// Truncated results kept at once, in all and per caller; past either, the oldest leave first
/// (in all: the oldest of the caller holding the most, so no caller can push out another's).
const MAX_KEPT: usize = 256;
const MAX_KEPT_PER_OWNER: usize = 32;
/// Bytes of text kept, in all and per caller. A rest longer than a caller's share is kept cut
/// to it, and the marker says so.
const MAX_KEPT_BYTES: usize = 64 << 20;
const MAX_KEPT_BYTES_PER_OWNER: usize = 16 << 20;
/// Handles dropped to keep those bounds, remembered so that reading one says why it is gone.
const MAX_DROPPED_REMEMBERED: usize = 1024;

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

/// The longest prefix of `text` of at most `max_bytes` bytes, cut on a character boundary.
fn prefix_bytes(text: &str, max_bytes: usize) -> &str {
    let mut end = max_bytes.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The bounds on what is kept.
#[derive(Debug, Clone, Copy)]
struct Caps {
    entries: usize,
    entries_per_owner: usize,
    bytes: usize,
    bytes_per_owner: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Self {
            entries: MAX_KEPT,
            entries_per_owner: MAX_KEPT_PER_OWNER,
            bytes: MAX_KEPT_BYTES,
            bytes_per_owner: MAX_KEPT_BYTES_PER_OWNER,
        }
    }
}

/// What is left to read of one truncated result. It has a lock of its own, held while it is
/// tokenized: reading one handle never makes another caller wait.
struct Page {
    rest: String,
    max_tokens: usize,
    /// The rest was cut to this many bytes to fit the caller's share.
    clipped_at: Option<usize>,
}

/// One kept result, as the shared table sees it (what eviction needs, without the text).
struct Slot {
    owner: Arc<str>,
    bytes: usize,
    /// When it was kept or last read (it expires `KEEP_FOR` after).
    stored: Instant,
    /// Order of keeping: the lowest is the oldest.
    seq: u64,
    page: Arc<Mutex<Page>>,
}

#[derive(Debug, Clone, Copy)]
enum DropReason {
    OwnerFull,
    AllFull,
}

struct Dropped {
    handle: String,
    owner: Arc<str>,
    why: DropReason,
}

#[derive(Default)]
struct Kept {
    slots: HashMap<String, Slot>,
    next_seq: u64,
    dropped: VecDeque<Dropped>,
}

impl Kept {
    fn owner_usage(&self, owner: &str) -> (usize, usize) {
        self.slots
            .values()
            .filter(|s| &*s.owner == owner)
            .fold((0, 0), |(n, b), s| (n + 1, b + s.bytes))
    }

    fn total_bytes(&self) -> usize {
        self.slots.values().map(|s| s.bytes).sum()
    }

    /// The handle kept first among `candidates`.
    fn oldest<'a>(
        &'a self,
        candidates: impl Iterator<Item = (&'a String, &'a Slot)>,
    ) -> Option<String> {
        candidates
            .min_by_key(|(_, slot)| slot.seq)
            .map(|(handle, _)| handle.clone())
    }

    fn evict(&mut self, handle: &str, why: DropReason) {
        if let Some(slot) = self.slots.remove(handle) {
            if self.dropped.len() >= MAX_DROPPED_REMEMBERED {
                self.dropped.pop_front();
            }
            self.dropped.push_back(Dropped {
                handle: handle.to_string(),
                owner: slot.owner,
                why,
            });
        }
    }

    /// Makes room for one more result of `bytes` bytes for `owner`.
    fn make_room(&mut self, owner: &str, bytes: usize, caps: &Caps) {
        // The caller's own share: its oldest leave.
        loop {
            let (entries, used) = self.owner_usage(owner);
            if entries < caps.entries_per_owner && used + bytes <= caps.bytes_per_owner {
                break;
            }
            let Some(oldest) = self.oldest(self.slots.iter().filter(|(_, s)| &*s.owner == owner))
            else {
                break;
            };
            self.evict(&oldest, DropReason::OwnerFull);
        }
        // The whole table: the oldest of whoever holds the most leaves.
        loop {
            let by_entries = self.slots.len() >= caps.entries;
            if !by_entries && self.total_bytes() + bytes <= caps.bytes {
                break;
            }
            let mut usage: HashMap<&str, usize> = HashMap::new();
            for slot in self.slots.values() {
                *usage.entry(&slot.owner).or_default() += if by_entries { 1 } else { slot.bytes };
            }
            let Some(largest) = usage
                .into_iter()
                .max_by_key(|(_, used)| *used)
                .map(|(owner, _)| owner.to_string())
            else {
                break;
            };
            let Some(oldest) = self.oldest(self.slots.iter().filter(|(_, s)| *s.owner == *largest))
            else {
                break;
            };
            self.evict(&oldest, DropReason::AllFull);
        }
    }

    /// Why `handle` cannot be read by `owner`.
    fn refusal(&self, handle: &str, owner: &str, caps: &Caps) -> String {
        let dropped = self
            .dropped
            .iter()
            .rev()
            .find(|d| d.handle == handle && &*d.owner == owner);
        match dropped.map(|d| d.why) {
            Some(DropReason::OwnerFull) => format!(
                "handle {handle:?} was dropped: at most {} truncated results ({} KiB of text) are kept per caller, and newer ones took its place. Call the tool again to get the result anew.",
                caps.entries_per_owner,
                caps.bytes_per_owner / 1024
            ),
            Some(DropReason::AllFull) => format!(
                "handle {handle:?} was dropped: the gateway keeps at most {} truncated results ({} KiB of text) in all, and made room for newer ones. Call the tool again to get the result anew.",
                caps.entries,
                caps.bytes / 1024
            ),
            // Someone else's handle reads exactly like one that does not exist.
            None => format!("unknown or expired handle {handle:?}"),
        }
    }
}

/// The parts of truncated results not yet read, by handle.
pub(crate) struct Remainders {
    kept: Mutex<Kept>,
    caps: Caps,
    /// Tokenizations done while the shared table was locked (there must be none).
    #[cfg(test)]
    tokenized_under_lock: std::sync::atomic::AtomicUsize,
}

impl Default for Remainders {
    fn default() -> Self {
        Self::with_caps(Caps::default())
    }
}

/// What one truncation did.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Truncation {
    pub total_tokens: usize,
    pub kept_tokens: usize,
    pub handle: String,
}

impl Remainders {
    fn with_caps(caps: Caps) -> Self {
        Self {
            kept: Mutex::default(),
            caps,
            #[cfg(test)]
            tokenized_under_lock: Default::default(),
        }
    }

    /// Runs tokenizer work; it must never run under the shared table's lock.
    fn tokenize<T>(&self, work: impl FnOnce() -> T) -> T {
        #[cfg(test)]
        if self.kept.is_locked() {
            self.tokenized_under_lock
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        work()
    }

    /// Keeps `rest` for `owner`; returns its handle, and the byte count it was cut to if it
    /// was longer than the caller's share.
    fn keep(&self, owner: &str, mut rest: String, max_tokens: usize) -> (String, Option<usize>) {
        let handle = uuid::Uuid::new_v4().simple().to_string();
        let share = self.caps.bytes_per_owner.min(self.caps.bytes);
        let clipped_at = (rest.len() > share).then(|| {
            let end = prefix_bytes(&rest, share).len();
            rest.truncate(end);
            share
        });
        let bytes = rest.len();
        let page = Arc::new(Mutex::new(Page {
            rest,
            max_tokens,
            clipped_at,
        }));
        let mut kept = self.kept.lock();
        let now = Instant::now();
        kept.slots
            .retain(|_, s| now.duration_since(s.stored) < KEEP_FOR);
        kept.make_room(owner, bytes, &self.caps);
        let seq = kept.next_seq;
        kept.next_seq += 1;
        kept.slots.insert(
            handle.clone(),
            Slot {
                owner: owner.into(),
                bytes,
                stored: now,
                seq,
                page,
            },
        );
        (handle, clipped_at)
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
        let counts: Vec<usize> = self.tokenize(|| {
            result
                .content
                .iter()
                .map(|block| block.as_text().map_or(0, |text| count_tokens(&text.text)))
                .collect()
        });
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
            let head = self.tokenize(|| prefix_within(&text.text, budget));
            let tail = text.text[head.len()..].to_string();
            kept_tokens += self.tokenize(|| count_tokens(head));
            if !head.is_empty() {
                kept_blocks.push(ContentBlock::text(head.to_string()));
            }
            rest.push(tail);
        }
        let (handle, clipped_at) = self.keep(owner, rest.join("\n\n"), max_tokens);
        let how = match page_tool {
            Some(tool) => {
                let mut how = format!(
                    "To read the rest, call the tool {tool} with {{\"handle\": \"{handle}\"}}."
                );
                if let Some(bytes) = clipped_at {
                    how.push_str(&format!(
                        " Only the next {bytes} bytes of it are kept (the limit per caller)."
                    ));
                }
                how
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
        let unknown = || format!("unknown or expired handle {handle:?}");
        let page = {
            let kept = self.kept.lock();
            match kept.slots.get(handle) {
                Some(slot) if &*slot.owner == owner && slot.stored.elapsed() < KEEP_FOR => {
                    slot.page.clone()
                }
                Some(_) => return Err(unknown()),
                None => return Err(kept.refusal(handle, owner, &self.caps)),
            }
        };
        // Reads of this one handle take turns here; the shared table is not locked meanwhile.
        let mut entry = page.lock();
        let still_kept = |kept: &Kept| {
            kept.slots
                .get(handle)
                .is_some_and(|slot| Arc::ptr_eq(&slot.page, &page))
        };
        {
            // Dropped, or read to its end, while this read waited its turn.
            let kept = self.kept.lock();
            if !still_kept(&kept) {
                return Err(kept.refusal(handle, owner, &self.caps));
            }
        }
        let limit = max_tokens.unwrap_or(entry.max_tokens).max(1);
        let head = self.tokenize(|| prefix_within(&entry.rest, limit).to_string());
        let remaining = entry.rest[head.len()..].to_string();
        if remaining.is_empty() {
            let mut kept = self.kept.lock();
            if still_kept(&kept) {
                kept.slots.remove(handle);
            }
            drop(kept);
            let mut blocks = vec![ContentBlock::text(head)];
            if let Some(bytes) = entry.clipped_at {
                blocks.push(ContentBlock::text(format!(
                    "[concord: that is all that was kept: the result went on past the {bytes} bytes kept per caller. Ask with a larger limit (_meta concord/max_result_tokens) to see more.]"
                )));
            }
            return Ok(CallToolResult::success(blocks));
        }
        let left = self.tokenize(|| count_tokens(&remaining));
        entry.rest = remaining;
        {
            let mut kept = self.kept.lock();
            if still_kept(&kept)
                && let Some(slot) = kept.slots.get_mut(handle)
            {
                slot.bytes = entry.rest.len();
                slot.stored = Instant::now();
            }
        }
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

    const TOOL: &str = "concord__result_page";

    /// Truncates a fresh long result for `owner` to 10 tokens; returns the result and handle.
    fn truncate(remainders: &Remainders, owner: &str, words: usize) -> (CallToolResult, String) {
        let text: Vec<String> = (0..words).map(|i| format!("w{i}")).collect();
        let mut result = CallToolResult::success(vec![ContentBlock::text(text.join(" "))]);
        let cut = remainders
            .limit(&mut result, 10, owner, Some(TOOL), false)
            .expect("truncated");
        (result, cut.handle)
    }

    /// Reads a handle to its end; returns everything read.
    fn read_all(remainders: &Remainders, handle: &str, owner: &str) -> Vec<String> {
        let mut parts = Vec::new();
        for _ in 0..1000 {
            let page = remainders.page(handle, owner, Some(50), TOOL).unwrap();
            let texts = text_of(&page);
            let more = texts.len() == 2 && texts[1].contains("more tokens");
            parts.extend(texts);
            if !more {
                return parts;
            }
        }
        panic!("never ended");
    }

    fn usage(remainders: &Remainders) -> (usize, usize) {
        let kept = remainders.kept.lock();
        (kept.slots.len(), kept.total_bytes())
    }

    #[test]
    fn each_caller_keeps_a_bounded_number_and_learns_why_one_is_gone() {
        let remainders = Remainders::with_caps(Caps {
            entries: 100,
            entries_per_owner: 3,
            bytes: 1 << 20,
            bytes_per_owner: 1 << 20,
        });
        let (_, bob) = truncate(&remainders, "bob", 200);
        let alice: Vec<String> = (0..5)
            .map(|_| truncate(&remainders, "alice", 200).1)
            .collect();
        assert_eq!(remainders.kept.lock().owner_usage("alice").0, 3);
        for gone in &alice[..2] {
            let refused = remainders.page(gone, "alice", None, TOOL).unwrap_err();
            assert!(
                refused.contains("was dropped")
                    && refused.contains("at most 3 truncated results")
                    && refused.contains("per caller"),
                "{refused}"
            );
            // Someone else learns nothing about it.
            let other = remainders.page(gone, "bob", None, TOOL).unwrap_err();
            assert_eq!(other, format!("unknown or expired handle {gone:?}"));
        }
        for kept in &alice[2..] {
            assert!(!read_all(&remainders, kept, "alice").is_empty());
        }
        // Alice's results never pushed out Bob's.
        assert!(!read_all(&remainders, &bob, "bob").is_empty());
        assert_eq!(
            remainders
                .tokenized_under_lock
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }

    #[test]
    fn the_table_is_bounded_in_all_and_makes_room_at_the_largest_caller() {
        let remainders = Remainders::with_caps(Caps {
            entries: 4,
            entries_per_owner: 3,
            bytes: 1 << 20,
            bytes_per_owner: 1 << 20,
        });
        let alice: Vec<String> = (0..3)
            .map(|_| truncate(&remainders, "alice", 200).1)
            .collect();
        let (_, bob) = truncate(&remainders, "bob", 200);
        let (_, carol) = truncate(&remainders, "carol", 200);
        let (_, dave) = truncate(&remainders, "dave", 200);
        assert_eq!(usage(&remainders).0, 4);
        // Alice held the most: her oldest two made room for Carol's and Dave's.
        for gone in &alice[..2] {
            let refused = remainders.page(gone, "alice", None, TOOL).unwrap_err();
            assert!(
                refused.contains("was dropped")
                    && refused.contains("at most 4 truncated results")
                    && refused.contains("in all"),
                "{refused}"
            );
        }
        for (handle, owner) in [
            (&alice[2], "alice"),
            (&bob, "bob"),
            (&carol, "carol"),
            (&dave, "dave"),
        ] {
            assert!(!read_all(&remainders, handle, owner).is_empty(), "{owner}");
        }
        assert_eq!(usage(&remainders), (0, 0));
    }

    #[test]
    fn kept_text_is_bounded_in_bytes_per_caller_and_in_all() {
        let remainders = Remainders::with_caps(Caps {
            entries: 100,
            entries_per_owner: 100,
            bytes: 300,
            bytes_per_owner: 200,
        });
        // A rest longer than a caller's share is kept cut to it, and the marker says so.
        let (result, first) = truncate(&remainders, "alice", 500);
        let texts = text_of(&result);
        assert!(
            texts[1].contains("Only the next 200 bytes of it are kept"),
            "{}",
            texts[1]
        );
        assert_eq!(usage(&remainders), (1, 200));
        // Alice's next one does not fit beside it: her first goes.
        let (_, second) = truncate(&remainders, "alice", 500);
        assert_eq!(usage(&remainders), (1, 200));
        let refused = remainders.page(&first, "alice", None, TOOL).unwrap_err();
        assert!(
            refused.contains("was dropped") && refused.contains("per caller"),
            "{refused}"
        );
        // Bob's does not fit in all: room is made at the largest holder (Alice).
        let (_, bob) = truncate(&remainders, "bob", 500);
        assert!(usage(&remainders).1 <= 300, "{:?}", usage(&remainders));
        let refused = remainders.page(&second, "alice", None, TOOL).unwrap_err();
        assert!(
            refused.contains("was dropped") && refused.contains("in all"),
            "{refused}"
        );
        // Reading the clipped rest ends with a marker saying the rest was not kept.
        let parts = read_all(&remainders, &bob, "bob");
        let last = parts.last().unwrap();
        assert!(
            last.contains("that is all that was kept") && last.contains("200 bytes"),
            "{last}"
        );
        let read: usize = parts
            .iter()
            .filter(|p| !p.starts_with("[concord:"))
            .map(String::len)
            .sum();
        assert_eq!(read, 200);
        assert_eq!(usage(&remainders), (0, 0));
    }

    #[test]
    fn pages_are_tokenized_outside_the_shared_lock() {
        let remainders = Remainders::default();
        let (_, handle) = truncate(&remainders, "alice", 400);
        read_all(&remainders, &handle, "alice");
        assert_eq!(
            remainders
                .tokenized_under_lock
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        // While one read of a handle holds it (mid-tokenization), another caller's read
        // goes through: only that one handle is locked.
        let (_, held) = truncate(&remainders, "alice", 400);
        let (_, other) = truncate(&remainders, "bob", 400);
        let page = remainders.kept.lock().slots[&held].page.clone();
        let _reading = page.lock();
        assert!(remainders.page(&other, "bob", None, TOOL).is_ok());
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
