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
                Value::String(text) if m.kind == "text" => text.chars().take(QUOTE_CHARS).collect(),
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

/// One ranked result.
struct Hit {
    score: u64,
    value: Value,
    ts: u64,
}

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
    let convs = match req.conv {
        Some(conv) => {
            require_member(logic, &conv, &caller.user).await?;
            vec![conv]
        }
        None => super::messages::user_convs(logic, &caller.user).await?.into_iter().map(|(c, _)| c).collect(),
    };
    let limit = req.limit.unwrap_or(20).clamp(1, MAX_RESULTS);
    let query = SearchQuery { convs, terms, from: req.from, before_ts: req.before, limit: logic.config.search_scan };
    let pieces = search::pieces(&req.q);
    let mut hits: Vec<Hit> = Vec::new();
    for found in logic.stores.messages.search(&query).await? {
        // The store matched hashes of terms: a collision is dropped here.
        if !contains_all(&found.text, &query.terms) {
            continue;
        }
        let (score, highlights) = rank(&found.text, &req.q, &pieces);
        let m = &found.msg;
        let value = json!({
            "conv": m.conv, "mid": m.mid, "seq": m.seq, "from": m.from, "ts": m.ts, "type": m.kind,
            "text": found.text, "highlights": highlights, "score": score,
        });
        hits.push(Hit { score, value, ts: m.ts });
    }
    hits.sort_by(|a, b| b.score.cmp(&a.score).then(b.ts.cmp(&a.ts)));
    let total = hits.len();
    let page: Vec<Value> = hits.into_iter().skip(req.offset).take(limit).map(|h| h.value).collect();
    let mut out = json!({"results": page});
    if req.offset + limit < total {
        out["next_offset"] = json!(req.offset + limit);
    }
    Ok(fields(out))
}

fn contains_all(text: &str, terms: &[i64]) -> bool {
    let doc: std::collections::HashSet<i64> = search::doc_terms(text).into_iter().collect();
    terms.iter().all(|t| doc.contains(t))
}

/// A result's score and highlights: every place (in chars, `[start, end)`) where a word or CJK
/// run of the query occurs in the text; the score counts them, and more when the whole query
/// occurs as written.
fn rank(text: &str, q: &str, pieces: &[Piece]) -> (u64, Vec<[usize; 2]>) {
    let low: Vec<char> = text.chars().map(search::lower).collect();
    let mut spans: Vec<[usize; 2]> = Vec::new();
    for p in pieces {
        let needle: Vec<char> = match p {
            Piece::Word(w) => w.chars().collect(),
            Piece::Cjk(cs) => cs.clone(),
        };
        if needle.is_empty() || needle.len() > low.len() {
            continue;
        }
        for start in 0..=low.len() - needle.len() {
            if low[start..start + needle.len()] == needle[..] {
                spans.push([start, start + needle.len()]);
            }
        }
    }
    let mut score = spans.len() as u64;
    let phrase: Vec<char> = q.trim().chars().map(search::lower).collect();
    if pieces.len() > 1 && !phrase.is_empty() && low.windows(phrase.len()).any(|w| w == &phrase[..]) {
        score += 10;
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
        let q = "Noon 明天";
        let (score, spans) = rank("我们明天 at NOON, noon!", q, &search::pieces(q));
        assert_eq!(spans, vec![[2, 4], [8, 12], [14, 18]]);
        assert_eq!(score, 3);
        let q = "at noon";
        let (phrase, _) = rank("meet at noon", q, &search::pieces(q));
        let (apart, _) = rank("noon, meet at one", q, &search::pieces(q));
        assert!(phrase > apart);
    }
}
