//! SentencePiece's BPE encoding of a normalized string: start from characters (user-defined pieces
//! kept whole), repeatedly merge the adjacent pair whose joined piece has the best score (leftmost
//! on ties), then split UNUSED pieces back into the pieces they were merged from.
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::proto::PieceType;
use super::proto::TokenId;

#[derive(Debug, Clone, Copy)]
struct Symbol {
    prev: Option<usize>,
    next: Option<usize>,
    /// User-defined pieces never merge.
    frozen: bool,
    start: usize,
    len: usize,
}

/// A candidate merge; `len` is the joined byte length, which tells whether it is stale.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    /// Higher score first, then the leftmost pair (the max-heap pops the greatest).
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.partial_cmp(&other.score).unwrap_or(Ordering::Equal).then_with(|| other.left.cmp(&self.left))
    }
}

/// What merging reads of a model's vocabulary (sentencepiece's `PieceToId`, scores and piece types).
pub(crate) trait Vocabulary {
    /// The id of `piece`, the unknown id when it has none.
    fn piece_to_id(&self, piece: &str) -> TokenId;
    fn kind(&self, id: TokenId) -> Option<PieceType>;
    /// The id of `piece` when merges may produce it.
    fn mergeable_id(&self, piece: &str) -> Option<TokenId>;
    fn score(&self, id: TokenId) -> f32;
    /// The length of the user-defined piece that `text` starts with, if any.
    fn user_defined_prefix(&self, text: &str) -> Option<usize>;
}

struct Merger<'a, V: Vocabulary + ?Sized> {
    sp: &'a V,
    text: &'a str,
    symbols: Vec<Symbol>,
    agenda: BinaryHeap<Candidate>,
    /// For merged pieces that are UNUSED: the two pieces they came from.
    unmerge: HashMap<&'a str, (&'a str, &'a str)>,
}

impl<'a, V: Vocabulary + ?Sized> Merger<'a, V> {
    fn piece(&self, i: usize) -> &'a str {
        let s = self.symbols[i];
        &self.text[s.start..s.start + s.len]
    }

    fn consider(&mut self, left: Option<usize>, right: Option<usize>) {
        let (Some(left), Some(right)) = (left, right) else {
            return;
        };
        let (l, r) = (self.symbols[left], self.symbols[right]);
        if l.frozen || r.frozen {
            return;
        }
        let joined = &self.text[l.start..r.start + r.len];
        let Some(id) = self.sp.mergeable_id(joined) else {
            return;
        };
        self.agenda.push(Candidate { score: self.sp.score(id), left, right, len: joined.len() });
        if self.sp.kind(id) == Some(PieceType::Unused) {
            let (lp, rp) = (self.piece(left), self.piece(right));
            self.unmerge.insert(joined, (lp, rp));
        }
    }

    fn resegment(&self, piece: &'a str, out: &mut Vec<(&'a str, TokenId)>) {
        let id = self.sp.piece_to_id(piece);
        if self.sp.kind(id) == Some(PieceType::Unused) {
            if let Some(&(l, r)) = self.unmerge.get(piece) {
                self.resegment(l, out);
                self.resegment(r, out);
                return;
            }
        }
        out.push((piece, id));
    }
}

/// Encodes `normalized` into pieces with their ids (`PieceToId`, so unknown pieces get the unknown
/// id). Empty input gives no pieces.
pub(crate) fn merge<'a, V: Vocabulary + ?Sized>(sp: &'a V, normalized: &'a str) -> Vec<(&'a str, TokenId)> {
    let mut symbols = Vec::with_capacity(normalized.len());
    let mut pos = 0;
    while pos < normalized.len() {
        let rest = &normalized[pos..];
        let (len, frozen) = match sp.user_defined_prefix(rest) {
            Some(len) => (len, true),
            None => (rest.chars().next().map_or(1, char::len_utf8), false),
        };
        let index = symbols.len();
        symbols.push(Symbol {
            prev: index.checked_sub(1),
            next: (pos + len < normalized.len()).then_some(index + 1),
            frozen,
            start: pos,
            len,
        });
        pos += len;
    }
    if symbols.is_empty() {
        return Vec::new();
    }

    let mut m = Merger { sp, text: normalized, symbols, agenda: BinaryHeap::new(), unmerge: HashMap::new() };
    for i in 1..m.symbols.len() {
        m.consider(Some(i - 1), Some(i));
    }
    while let Some(top) = m.agenda.pop() {
        let (l, r) = (m.symbols[top.left], m.symbols[top.right]);
        if l.len == 0 || r.len == 0 || l.len + r.len != top.len {
            continue; // one side was merged away since this candidate was pushed
        }
        m.symbols[top.left].len += r.len;
        m.symbols[top.left].next = r.next;
        if let Some(next) = r.next {
            m.symbols[next].prev = Some(top.left);
        }
        m.symbols[top.right].len = 0;
        m.consider(m.symbols[top.left].prev, Some(top.left));
        m.consider(Some(top.left), m.symbols[top.left].next);
    }

    let mut out = Vec::new();
    let mut index = Some(0);
    while let Some(i) = index {
        m.resegment(m.piece(i), &mut out);
        index = m.symbols[i].next;
    }
    out
}
