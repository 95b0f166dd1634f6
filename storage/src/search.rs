//! What the stores index for `search`: the searchable text of a message, its terms (words,
//! and character n-grams where a script does not separate words by spaces), and the query
//! every store answers. One tokenizer serves every backend, so a query finds the same messages
//! in each.
//!
//! A term is kept as a 64-bit hash (FNV-1a of its text): the stores index integers, and the
//! caller checks every candidate's text again, so a collision never reaches a result.

use serde_json::Value;

use crate::Message;

/// Most distinct terms indexed per message (a longer text is indexed by its first terms).
pub const MAX_TERMS: usize = 1024;
/// Longest word kept as one term, in chars (a longer run is cut there).
const MAX_WORD_CHARS: usize = 64;

/// Whether `c` belongs to a script written without spaces between words (Han, kana, Hangul),
/// indexed by overlapping pairs of characters.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF
        | 0xAC00..=0xD7AF | 0x20000..=0x2FFFF)
}

/// One char, lowercased to a single char (the first of its lowercase form), so positions in
/// the lowered text are positions in the original.
pub fn lower(c: char) -> char {
    c.to_lowercase().next().unwrap_or(c)
}

/// A piece of text as the tokenizer splits it: a word, or a run of CJK characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Piece {
    Word(String),
    Cjk(Vec<char>),
}

/// The pieces of `text`, lowercased, in order.
pub fn pieces(text: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    let (mut word, mut cjk) = (String::new(), Vec::new());
    let mut word_chars = 0;
    let flush = |out: &mut Vec<Piece>, word: &mut String, word_chars: &mut usize, cjk: &mut Vec<char>| {
        if !word.is_empty() {
            out.push(Piece::Word(std::mem::take(word)));
            *word_chars = 0;
        }
        if !cjk.is_empty() {
            out.push(Piece::Cjk(std::mem::take(cjk)));
        }
    };
    for c in text.chars() {
        if is_cjk(c) {
            if !word.is_empty() {
                out.push(Piece::Word(std::mem::take(&mut word)));
                word_chars = 0;
            }
            cjk.push(c);
        } else if c.is_alphanumeric() {
            if !cjk.is_empty() {
                out.push(Piece::Cjk(std::mem::take(&mut cjk)));
            }
            if word_chars < MAX_WORD_CHARS {
                word.push(lower(c));
                word_chars += 1;
            }
        } else {
            flush(&mut out, &mut word, &mut word_chars, &mut cjk);
        }
    }
    flush(&mut out, &mut word, &mut word_chars, &mut cjk);
    out
}

/// Whether `text` holds every piece of a query, compared as text (not as hashes): each word as
/// a whole word, each CJK run's pairs of neighbouring characters (its one character, for a run
/// of one) inside a CJK run of the text.
pub fn holds(text: &str, query: &[Piece]) -> bool {
    let doc = pieces(text);
    let words: std::collections::HashSet<&str> = doc
        .iter()
        .filter_map(|p| match p {
            Piece::Word(w) => Some(w.as_str()),
            Piece::Cjk(_) => None,
        })
        .collect();
    let runs: Vec<&Vec<char>> = doc
        .iter()
        .filter_map(|p| match p {
            Piece::Cjk(cs) => Some(cs),
            Piece::Word(_) => None,
        })
        .collect();
    query.iter().all(|p| match p {
        Piece::Word(w) => words.contains(w.as_str()),
        Piece::Cjk(cs) if cs.len() == 1 => runs.iter().any(|r| r.contains(&cs[0])),
        Piece::Cjk(cs) => cs.windows(2).all(|pair| runs.iter().any(|r| r.windows(2).any(|w| w == pair))),
    })
}

/// FNV-1a of a term's text, as the stores keep it.
fn hash(tag: u8, s: impl Iterator<Item = char>) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut step = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    step(tag);
    let mut buf = [0u8; 4];
    for c in s {
        for b in c.encode_utf8(&mut buf).bytes() {
            step(b);
        }
    }
    h as i64
}

/// The terms a document is indexed by: each word, and each CJK character and pair of
/// neighbouring characters; distinct, at most [`MAX_TERMS`].
pub fn doc_terms(text: &str) -> Vec<i64> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for p in pieces(text) {
        let terms: Vec<i64> = match &p {
            Piece::Word(w) => vec![hash(b'w', w.chars())],
            Piece::Cjk(cs) => {
                let mut t: Vec<i64> = cs.iter().map(|c| hash(b'c', std::iter::once(*c))).collect();
                t.extend(cs.windows(2).map(|w| hash(b'c', w.iter().copied())));
                t
            }
        };
        for t in terms {
            if seen.insert(t) {
                out.push(t);
                if out.len() == MAX_TERMS {
                    return out;
                }
            }
        }
    }
    out
}

/// The terms a query needs, every one of them: its words, and the pairs of each CJK run (the
/// character itself for a run of one).
pub fn query_terms(q: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for p in pieces(q) {
        match &p {
            Piece::Word(w) => out.push(hash(b'w', w.chars())),
            Piece::Cjk(cs) if cs.len() == 1 => out.push(hash(b'c', cs.iter().copied())),
            Piece::Cjk(cs) => out.extend(cs.windows(2).map(|w| hash(b'c', w.iter().copied()))),
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The text a message is found by: a text message's body, a file's name; `None` for other
/// types (events, custom bodies, recalled messages).
pub fn searchable(kind: &str, body: &Value) -> Option<String> {
    match kind {
        "text" => body.as_str().map(str::to_owned),
        "image" | "file" | "audio" | "video" => body.get("name").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// The type of an edit event (see the logic's events): body `{mid, text}`.
const EDIT: &str = "edit";

/// What storing `m` does to the search index.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexChange {
    /// Nothing to index.
    None,
    /// Index `m` itself by this text.
    Add(String),
    /// `m` is an edit: the message `mid` is now found by this text (if this edit is later than
    /// whatever set its text before; `m.seq` orders them).
    Edit { mid: String, text: String },
}

/// What the index does for `m` as stored.
pub fn change_of(m: &Message) -> IndexChange {
    if m.kind == EDIT {
        let mid = m.body.get("mid").and_then(Value::as_str);
        let text = m.body.get("text").and_then(Value::as_str);
        return match (mid, text) {
            (Some(mid), Some(text)) => IndexChange::Edit { mid: mid.to_owned(), text: text.to_owned() },
            _ => IndexChange::None,
        };
    }
    match searchable(&m.kind, &m.body) {
        Some(text) => IndexChange::Add(text),
        None => IndexChange::None,
    }
}

/// A search as the stores answer it: the newest messages of `convs` whose current text holds
/// every term.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchQuery {
    pub convs: Vec<String>,
    /// From [`query_terms`]; never empty.
    pub terms: Vec<i64>,
    /// Only messages of this sender.
    pub from: Option<String>,
    /// Only messages older than this (ms).
    pub before_ts: Option<u64>,
    /// Most candidates returned.
    pub limit: usize,
}

/// A candidate: the message as stored and the text it is found by now (an edit's, if edited).
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub msg: Message,
    pub text: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_cjk_pairs() {
        assert_eq!(
            pieces("Hello, 世界ok 你好!"),
            vec![
                Piece::Word("hello".into()),
                Piece::Cjk(vec!['世', '界']),
                Piece::Word("ok".into()),
                Piece::Cjk(vec!['你', '好'])
            ]
        );
        let doc = doc_terms("我们明天见 Meeting at NOON");
        for q in ["明天", "明", "meeting noon", "NOON", "我们明天见", "天见"] {
            let t = query_terms(q);
            assert!(!t.is_empty() && t.iter().all(|x| doc.contains(x)), "{q}");
        }
        for q in ["明后", "meetings", "afternoon"] {
            assert!(!query_terms(q).iter().all(|x| doc.contains(x)), "{q}");
        }
        assert!(query_terms("  ,.! ").is_empty());
        for (q, found) in [("明天 noon", true), ("明见", false), ("noo", false), ("見", false), ("见", true)] {
            assert_eq!(holds("我们明天见 at noon", &pieces(q)), found, "{q}");
        }
    }

    #[test]
    fn terms_are_bounded() {
        let long: String = (0..5000).map(|i| format!("w{i} ")).collect();
        assert_eq!(doc_terms(&long).len(), MAX_TERMS);
        let word = "x".repeat(1000);
        assert_eq!(pieces(&word), vec![Piece::Word("x".repeat(MAX_WORD_CHARS))]);
    }
}
