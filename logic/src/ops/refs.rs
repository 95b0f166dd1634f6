//! Replies and mentions of `send` (checked against the conversation), and `search` over the
//! caller's conversations: the store finds the newest messages holding every term of the
//! query; they are ranked here, with the places of the query's words in each text.

use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_storage::search::{self, Piece, SearchQuery};
use switchboard_storage::Quote;

use super::messages::require_member;
use super::{fields, Caller, Fields};
use crate::error::ApiError;
use crate::Logic;

/// Chars of a text message a reply quotes.
const QUOTE_CHARS: usize = 100;
/// Longest `search` query, in chars.
const MAX_QUERY_CHARS: usize = 256;
/// Most terms of one `search` query (words and CJK pairs).
const MAX_QUERY_TERMS: usize = 16;
/// Most results of one `search` page.
const MAX_RESULTS: usize = 50;

/// What a `send` refers to, checked: the quote of the message it replies to (of the same
/// conversation, not an event, not recalled) and the members it mentions (each once, the
/// sender left out).
pub async fn check(
    logic: &Logic,
    caller: &Caller,
    conv: &str,
    members: &[String],
    reply_to: Option<String>,
    mentions: Vec<String>,
) -> Result<(Option<Box<Quote>>, Vec<String>), ApiError> {
    let quote = match reply_to {
        None => None,
        Some(mid) => {
            let Some(m) = logic.stores.messages.find_mid(conv, &mid).await? else {
                return Err(ApiError::bad_request(format!("no message `{mid}` in `{conv}` to reply to")));
            };
            if super::events::is_event(&m.kind) {
                return Err(ApiError::bad_request(format!("`{mid}` is an event, not a message")));
            }
            if m.kind == "recalled" {
                return Err(ApiError::new("recalled", format!("message `{mid}` was recalled")));
            }
            let preview = match &m.body {
                Value::String(_) if m.kind == "text" => {
                    // its current text: an edit made before the reply counts
                    let (folded, _) = super::events::fold(logic, &caller.user, conv, vec![m.clone()]).await?;
                    let text = folded.first().and_then(|f| f["body"].as_str()).or(m.body.as_str()).unwrap_or_default();
                    text.chars().take(QUOTE_CHARS).collect()
                }
                _ => search::searchable(&m.kind, &m.body).unwrap_or_default(),
            };
            Some(Box::new(Quote { mid: m.mid, seq: m.seq, from: m.from, kind: m.kind, preview }))
        }
    };
    let mut out: Vec<String> = Vec::new();
    for user in mentions {
        if user == caller.user || out.contains(&user) {
            continue;
        }
        if !members.contains(&user) {
            return Err(ApiError::bad_request(format!("`{user}` is not a member of `{conv}`")));
        }
        out.push(user);
    }
    if out.len() > logic.config.max_mentions {
        return Err(ApiError::bad_request(format!("at most {} mentions per message", logic.config.max_mentions)));
    }
    Ok((quote, out))
}

#[derive(Deserialize)]
pub struct Search {
    q: String,
    conv: Option<String>,
    from: Option<String>,
    /// Only messages sent before this time (ms).
    before: Option<u64>,
    limit: Option<usize>,
    /// Results to skip (the `next_offset` of the previous page).
    #[serde(default)]
    offset: usize,
}

/// One ranked candidate.
struct Hit {
    score: u64,
    found: search::Found,
}

/// Chars of a result's text that ranking and highlights look at (the rest is returned as is).
const RANK_CHARS: usize = 4096;
/// Most highlights per result.
const MAX_HIGHLIGHTS: usize = 32;

pub async fn search(logic: &Logic, caller: &Caller, req: Search) -> Result<Fields, ApiError> {
    if req.q.chars().count() > MAX_QUERY_CHARS {
        return Err(ApiError::bad_request(format!("a query is at most {MAX_QUERY_CHARS} chars")));
    }
    let terms = search::query_terms(&req.q);
    if terms.is_empty() {
        return Err(ApiError::bad_request("the query has no words to search for"));
    }
    if terms.len() > MAX_QUERY_TERMS {
        return Err(ApiError::bad_request(format!("a query is at most {MAX_QUERY_TERMS} words")));
    }
    let scan = logic.config.search_scan;
    if req.offset >= scan {
        return Err(ApiError::bad_request(format!("offset is below {scan}")));
    }
    let convs = match req.conv {
        Some(conv) => {
            require_member(logic, &conv, &caller.user).await?;
            vec![conv]
        }
        None => super::messages::user_convs(logic, &caller.user).await?.into_iter().map(|(c, _)| c).collect(),
    };
    let limit = req.limit.unwrap_or(20).clamp(1, MAX_RESULTS);
    let query = SearchQuery { convs, terms, from: req.from, before_ts: req.before, limit: scan };
    let mut pieces = search::pieces(&req.q);
    let mut seen = std::collections::HashSet::new();
    pieces.retain(|p| seen.insert(p.clone()));
    let phrase: String = req.q.trim().chars().map(search::lower).collect();
    let mut hits: Vec<Hit> = Vec::new();
    for found in logic.stores.messages.search(&query).await? {
        // The store matched hashes of terms; the text itself decides.
        if !search::holds(&found.text, &pieces) {
            continue;
        }
        let (score, _) = rank(&found.text, &phrase, &pieces, 0);
        hits.push(Hit { score, found });
    }
    hits.sort_by(|a, b| b.score.cmp(&a.score).then(b.found.msg.ts.cmp(&a.found.msg.ts)));
    let total = hits.len();
    let mut page: Vec<Value> = hits
        .into_iter()
        .skip(req.offset)
        .take(limit)
        .map(|h| {
            let (score, highlights) = rank(&h.found.text, &phrase, &pieces, MAX_HIGHLIGHTS);
            let m = &h.found.msg;
            json!({
                "conv": m.conv, "mid": m.mid, "seq": m.seq, "from": m.from, "ts": m.ts, "type": m.kind,
                "text": h.found.text, "highlights": highlights, "score": score,
            })
        })
        .collect();
    // One reply's bytes are bounded like `history`'s (at least one result goes).
    super::messages::cut_to_bytes(&mut page, logic.config.reply_max_bytes);
    let next = req.offset + page.len();
    let mut out = json!({"results": page});
    if next < total {
        out["next_offset"] = json!(next);
    }
    Ok(fields(out))
}

/// A result's score, and up to `max_highlights` places (in chars, `[start, end)`) where a word
/// (whole) or a CJK run of the query occurs in the first [`RANK_CHARS`] of the text. The score
/// counts the places, and 10 more when the whole query (lowercased: `phrase`) occurs as
/// written.
fn rank(text: &str, phrase: &str, pieces: &[Piece], max_highlights: usize) -> (u64, Vec<[usize; 2]>) {
    let low: Vec<char> = text.chars().take(RANK_CHARS).map(search::lower).collect();
    let wordish = |c: char| c.is_alphanumeric() && !search::is_cjk(c);
    let mut spans: Vec<[usize; 2]> = Vec::new();
    let mut score = 0u64;
    for p in pieces {
        let (needle, whole): (Vec<char>, bool) = match p {
            Piece::Word(w) => (w.chars().collect(), true),
            Piece::Cjk(cs) => (cs.clone(), false),
        };
        if needle.is_empty() || needle.len() > low.len() {
            continue;
        }
        let mut start = 0;
        while start + needle.len() <= low.len() {
            let end = start + needle.len();
            let at_bounds =
                !whole || (start == 0 || !wordish(low[start - 1])) && (end == low.len() || !wordish(low[end]));
            if low[start..end] == needle[..] && at_bounds {
                score += 1;
                if spans.len() < max_highlights {
                    spans.push([start, end]);
                }
                start = end;
            } else {
                start += 1;
            }
        }
    }
    if pieces.len() > 1 && !phrase.is_empty() {
        let head: String = low.iter().collect();
        if head.contains(phrase) {
            score += 10;
        }
    }
    spans.sort_unstable();
    // overlapping places merge into one
    let mut merged: Vec<[usize; 2]> = Vec::new();
    for s in spans {
        match merged.last_mut() {
            Some(last) if s[0] <= last[1] => last[1] = last[1].max(s[1]),
            _ => merged.push(s),
        }
    }
    (score, merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_and_highlights_by_chars() {
        let (q, p) = ("noon 明天", search::pieces("Noon 明天"));
        let (score, spans) = rank("我们明天 at NOON, noon! afternoon noons", q, &p, 32);
        assert_eq!(spans, vec![[2, 4], [8, 12], [14, 18]], "whole words only");
        assert_eq!(score, 3);
        let (_, few) = rank("我们明天 at NOON, noon!", q, &p, 1);
        assert_eq!(few.len(), 1);
        let (q, p) = ("at noon", search::pieces("at noon"));
        let (phrase, _) = rank("meet at noon", q, &p, 0);
        let (apart, _) = rank("noon, meet at one", q, &p, 0);
        assert!(phrase > apart);
    }
}
