//! Work the engine keeps from recent requests so that a request repeating it skips it: the projected
//! features of a request's images, and the KV cache of whole prompts, whose leading positions a later
//! prompt that starts the same way takes instead of computing them. One byte budget covers both; the
//! least recently used entry leaves first, and nothing larger than the budget is kept.
//!
//! Images are found by their preprocessed pixels (compared in full, never by placeholder tokens), so
//! two different images never share features. A prompt position is identified by what fills it (a
//! token id, or feature `i` of image `j` of a known image set) and by whether it takes the visual
//! LoRA branch: the MM-LoRA mask is chosen by position, so a cached position is reused only where the
//! new prompt computes it under the same mask.
use crate::error::Result;
use crate::llm::KvCache;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tch::Tensor;

/// What fills one prompt position, and whether the visual LoRA branch computes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PositionKey {
    pub filled_by: Filler,
    pub visual: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Filler {
    Token(i64),
    /// Feature `feature` of image `image` in the image set `set` (a request's images, numbered by the
    /// cache; a number is never given to two different sets).
    Image {
        set: u64,
        image: i64,
        feature: i64,
    },
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ReuseStats {
    image_hits: AtomicU64,
    image_misses: AtomicU64,
    prefix_hits: AtomicU64,
    prefix_misses: AtomicU64,
    reused_positions: AtomicU64,
    bytes: AtomicU64,
    entries: AtomicU64,
    budget: AtomicU64,
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReuseStatsSnapshot {
    /// Requests whose images' features were cached / computed.
    pub image_hits: u64,
    pub image_misses: u64,
    /// Prompts that started from cached positions / from none.
    pub prefix_hits: u64,
    pub prefix_misses: u64,
    /// Prompt positions taken from the cache instead of computed.
    pub reused_positions: u64,
    /// Bytes held now (features and KV caches), never more than `budget`.
    pub bytes: u64,
    pub entries: u64,
    pub budget: u64,
}

impl ReuseStats {
    pub fn snapshot(&self) -> ReuseStatsSnapshot {
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        ReuseStatsSnapshot {
            image_hits: get(&self.image_hits),
            image_misses: get(&self.image_misses),
            prefix_hits: get(&self.prefix_hits),
            prefix_misses: get(&self.prefix_misses),
            reused_positions: get(&self.reused_positions),
            bytes: get(&self.bytes),
            entries: get(&self.entries),
            budget: get(&self.budget),
        }
    }

    fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

struct ImageEntry {
    /// `[N, 3, S, S]` as preprocessed: the key.
    pixels: Tensor,
    features: Tensor,
    set: u64,
    bytes: usize,
    used: u64,
}

struct PromptEntry {
    key: Vec<PositionKey>,
    /// Exactly the key's positions, one row.
    kv: KvCache,
    bytes: usize,
    used: u64,
}

/// The engine's cache of image features and prompt KV caches (owned by the engine's thread).
pub(super) struct ReuseCache {
    budget: usize,
    /// The prefill's chunk size: reuse ends at its multiples.
    align: Option<usize>,
    clock: u64,
    next_set: u64,
    images: Vec<ImageEntry>,
    prompts: Vec<PromptEntry>,
    stats: Arc<ReuseStats>,
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

impl ReuseCache {
    /// A cache holding at most `budget` bytes (0 keeps nothing), reusing prompt positions up to
    /// multiples of `align`.
    pub fn new(budget: usize, align: Option<usize>) -> Self {
        let stats = Arc::new(ReuseStats::default());
        stats.budget.store(budget as u64, Ordering::Relaxed);
        Self {
            budget,
            align: align.filter(|&a| a > 0),
            clock: 0,
            next_set: 0,
            images: Vec::new(),
            prompts: Vec::new(),
            stats,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.budget > 0
    }

    pub fn stats(&self) -> Arc<ReuseStats> {
        self.stats.clone()
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn held(&self) -> usize {
        self.images.iter().map(|e| e.bytes).sum::<usize>() + self.prompts.iter().map(|e| e.bytes).sum::<usize>()
    }

    /// The features of `pixels` (a request's images) and the number of their set: cached ones when the
    /// same pixels were seen, else `compute()`'s, kept when they fit.
    pub fn image_features(
        &mut self,
        pixels: &Tensor,
        compute: impl FnOnce() -> Result<Tensor>,
    ) -> Result<(Tensor, u64)> {
        let now = self.tick();
        let mut found = None;
        for entry in &mut self.images {
            if entry.pixels.size() == pixels.size()
                && entry.pixels.kind() == pixels.kind()
                && entry.pixels.f_equal(pixels)?
            {
                entry.used = now;
                found = Some((entry.features.shallow_clone(), entry.set));
                break;
            }
        }
        if let Some(hit) = found {
            ReuseStats::count(&self.stats.image_hits, 1);
            return Ok(hit);
        }
        ReuseStats::count(&self.stats.image_misses, 1);
        let features = compute()?;
        let set = self.next_set;
        self.next_set += 1;
        let bytes = tensor_bytes(pixels) + tensor_bytes(&features);
        if self.make_room(bytes) {
            let pixels = pixels.shallow_clone();
            self.images.push(ImageEntry { pixels, features: features.shallow_clone(), set, bytes, used: now });
            self.publish();
        }
        Ok((features, set))
    }

    /// A cache with room for `capacity` positions that holds the longest cached run of leading
    /// positions of `key`, leaving at least the last position to compute (its logits start the
    /// answer) and ending at a chunk's end when prompts are prefilled in chunks; `None` when no cached
    /// prompt starts the same way.
    ///
    /// Without chunks the rest is one forward of fewer rows than the whole prompt's, which libtorch's
    /// GEMM sums in another order (its blocking depends on the row count; a 4096 x 11008 projection
    /// differed in the low bits for every row count tried): answers then equal fresh ones up to near
    /// ties, as in a batch. With chunks both run the same forwards.
    pub fn lookup(&mut self, key: &[PositionKey], capacity: i64) -> Result<Option<KvCache>> {
        let usable = key.len().saturating_sub(1);
        let align = self.align.unwrap_or(1);
        let best = self
            .prompts
            .iter_mut()
            .map(|entry| {
                let common = entry.key.iter().zip(key).take_while(|(a, b)| a == b).count();
                (common.min(usable) / align * align, entry)
            })
            .filter(|(common, _)| *common > 0)
            .max_by_key(|(common, entry)| (*common, entry.used));
        let Some((common, entry)) = best else {
            ReuseStats::count(&self.stats.prefix_misses, 1);
            return Ok(None);
        };
        self.clock += 1;
        entry.used = self.clock;
        let kv = entry.kv.copy_prefix(common as i64, capacity)?;
        ReuseStats::count(&self.stats.prefix_hits, 1);
        ReuseStats::count(&self.stats.reused_positions, common as u64);
        Ok(Some(kv))
    }

    /// Keeps a copy of `cache`'s first `key.len()` positions (a prompt just prefilled) for later
    /// prompts, unless it does not fit the budget. Cached prompts that are leading parts of this one
    /// leave: this one serves every prompt they would.
    pub fn remember(&mut self, key: Vec<PositionKey>, cache: &KvCache) -> Result<()> {
        let len = key.len() as i64;
        let now = self.tick();
        if let Some(same) = self.prompts.iter_mut().find(|e| e.key == key) {
            same.used = now;
            return Ok(());
        }
        let bytes = cache.cached_bytes() / cache.len().max(1) as usize * key.len();
        self.prompts.retain(|e| !(e.key.len() < key.len() && key.starts_with(&e.key)));
        if self.make_room(bytes) {
            let kv = cache.copy_prefix(len, len)?;
            self.prompts.push(PromptEntry { key, kv, bytes, used: now });
        }
        self.publish();
        Ok(())
    }

    /// Drops least recently used entries until `bytes` more fit; false when they cannot.
    fn make_room(&mut self, bytes: usize) -> bool {
        if bytes > self.budget {
            return false;
        }
        while self.held() + bytes > self.budget {
            let oldest_image = self.images.iter().enumerate().min_by_key(|(_, e)| e.used).map(|(i, e)| (i, e.used));
            let oldest_prompt = self.prompts.iter().enumerate().min_by_key(|(_, e)| e.used).map(|(i, e)| (i, e.used));
            match (oldest_image, oldest_prompt) {
                (Some((i, a)), Some((_, b))) if a <= b => drop(self.images.remove(i)),
                (_, Some((j, _))) => drop(self.prompts.remove(j)),
                (Some((i, _)), None) => drop(self.images.remove(i)),
                (None, None) => return false,
            }
        }
        true
    }

    fn publish(&self) {
        self.stats.bytes.store(self.held() as u64, Ordering::Relaxed);
        self.stats.entries.store((self.images.len() + self.prompts.len()) as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn tokens(ids: &[i64]) -> Vec<PositionKey> {
        ids.iter().map(|&id| PositionKey { filled_by: Filler::Token(id), visual: false }).collect()
    }

    /// A one-layer cache of `len` positions whose values are the position numbers.
    fn filled(len: i64) -> KvCache {
        let mut cache = KvCache::new(1, 1, 1, 2, len, Kind::Float, Device::Cpu).unwrap();
        cache.reserve(len).unwrap();
        let values = Tensor::arange(len, (Kind::Float, Device::Cpu)).view([1, 1, len, 1]).expand([1, 1, len, 2], false);
        let _ = cache.update(0, &values, &values).unwrap();
        cache.advance(len);
        cache
    }

    #[test]
    fn a_prompt_reuses_the_longest_common_leading_positions_but_never_its_last() {
        let mut reuse = ReuseCache::new(1 << 20, None);
        reuse.remember(tokens(&[1, 2, 3, 4]), &filled(4)).unwrap();
        let kv = reuse.lookup(&tokens(&[1, 2, 9, 9, 9]), 8).unwrap().unwrap();
        assert_eq!((kv.len(), kv.capacity()), (2, 8));
        // The same prompt again: all but the last position.
        assert_eq!(reuse.lookup(&tokens(&[1, 2, 3, 4]), 8).unwrap().unwrap().len(), 3);
        assert!(reuse.lookup(&tokens(&[7, 2, 3, 4]), 8).unwrap().is_none());
        // A position computed under the other LoRA branch is not the same position.
        let mut visual = tokens(&[1, 2, 3]);
        visual[1].visual = true;
        assert_eq!(reuse.lookup(&visual, 8).unwrap().unwrap().len(), 1);
        let s = reuse.stats().snapshot();
        assert_eq!((s.prefix_hits, s.prefix_misses, s.reused_positions), (3, 1, 6));
        // With chunks of 2, reuse ends at a multiple of 2.
        let mut chunked = ReuseCache::new(1 << 20, Some(2));
        chunked.remember(tokens(&[1, 2, 3, 4, 5]), &filled(5)).unwrap();
        assert_eq!(chunked.lookup(&tokens(&[1, 2, 3, 4, 5]), 8).unwrap().unwrap().len(), 4);
        assert_eq!(chunked.lookup(&tokens(&[1, 2, 3, 9]), 8).unwrap().unwrap().len(), 2);
        assert!(chunked.lookup(&tokens(&[1, 9]), 8).unwrap().is_none());
    }

    #[test]
    fn the_budget_bounds_what_is_kept_and_the_least_recently_used_leaves_first() {
        let per_position = filled(1).cached_bytes();
        let mut reuse = ReuseCache::new(per_position * 10, None);
        reuse.remember(tokens(&[1, 1, 1, 1]), &filled(4)).unwrap();
        reuse.remember(tokens(&[2, 2, 2, 2]), &filled(4)).unwrap();
        // Touch the first: the second is now the oldest and leaves for a third.
        assert!(reuse.lookup(&tokens(&[1, 1, 5]), 4).unwrap().is_some());
        reuse.remember(tokens(&[3, 3, 3, 3]), &filled(4)).unwrap();
        assert!(reuse.stats().snapshot().bytes as usize <= per_position * 10);
        assert!(reuse.lookup(&tokens(&[2, 2, 5]), 4).unwrap().is_none());
        assert!(reuse.lookup(&tokens(&[1, 1, 5]), 4).unwrap().is_some());
        // Larger than the whole budget: not kept, nothing else dropped for it.
        reuse.remember(tokens(&[4; 11]), &filled(11)).unwrap();
        assert!(reuse.lookup(&tokens(&[4; 11]), 12).unwrap().is_none());
        assert_eq!(reuse.stats().snapshot().entries, 2);
        // A prompt that extends a cached one replaces it.
        reuse.remember(tokens(&[1, 1, 1, 1, 6]), &filled(5)).unwrap();
        assert_eq!(reuse.stats().snapshot().entries, 2);
        // Nothing at all with a budget of 0.
        let mut off = ReuseCache::new(0, None);
        off.remember(tokens(&[1, 2]), &filled(2)).unwrap();
        assert!(off.lookup(&tokens(&[1, 2, 3]), 4).unwrap().is_none());
    }

    #[test]
    fn different_pixels_never_share_features() {
        let mut reuse = ReuseCache::new(1 << 20, None);
        let a = Tensor::zeros([1, 3, 4, 4], (Kind::Float, Device::Cpu));
        let b = a.copy();
        let _ = b.get(0).get(1).get(2).get(3).fill_(1e-6);
        let (fa, set_a) = reuse.image_features(&a, || Ok(Tensor::from_slice(&[1.0f32]))).unwrap();
        let (fb, set_b) = reuse.image_features(&b, || Ok(Tensor::from_slice(&[2.0f32]))).unwrap();
        assert_ne!(set_a, set_b);
        assert!(!fa.equal(&fb));
        let (again, set) = reuse.image_features(&a.copy(), || panic!("computed again")).unwrap();
        assert_eq!(set, set_a);
        assert!(again.equal(&fa));
        let s = reuse.stats().snapshot();
        assert_eq!((s.image_hits, s.image_misses), (1, 2));
    }
}
