//! The decoder's key/value cache, owned by the caller.
//!
//! Keys (after rotary) and values of every layer live in buffers `[B, kv_heads, capacity, head_dim]`; a
//! forward writes its positions in place and attends over a view of the first `len` positions, which holds
//! the same values as transformers' `DynamicCache` (`cat` of all steps). When full, the buffers grow by
//! whole chunks, so a copy happens once per chunk, not at every step.
use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor};

/// Positions added when a full cache grows, unless the caller sets another chunk.
pub const DEFAULT_GROW_BY: i64 = 256;

#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    /// Where this layer computes: its keys and values stay beside its weights.
    kind: Kind,
    device: Device,
}

#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    batch: i64,
    kv_heads: i64,
    head_dim: i64,
    capacity: i64,
    len: i64,
    grow_by: i64,
}

impl KvCache {
    /// An empty cache for `num_layers` layers holding `capacity` positions before it first grows.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        num_layers: usize,
        batch: i64,
        kv_heads: i64,
        head_dim: i64,
        capacity: i64,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        Self::with_sites(&vec![(kind, device); num_layers], batch, kv_heads, head_dim, capacity)
    }

    /// An empty cache whose layer `i` keeps its keys and values in `sites[i]` (dtype, device): a decoder
    /// split over devices keeps each layer's cache on that layer's device.
    pub fn with_sites(
        sites: &[(Kind, Device)],
        batch: i64,
        kv_heads: i64,
        head_dim: i64,
        capacity: i64,
    ) -> Result<Self> {
        if batch <= 0 || kv_heads <= 0 || head_dim <= 0 || capacity < 0 {
            return Err(Error::InvalidInput(format!(
                "KV cache: batch {batch}, kv heads {kv_heads}, head_dim {head_dim}, capacity {capacity}"
            )));
        }
        let layers = sites.iter().map(|&(kind, device)| LayerKv { k: Tensor::new(), v: Tensor::new(), kind, device });
        let mut cache =
            Self { layers: layers.collect(), batch, kv_heads, head_dim, capacity: 0, len: 0, grow_by: DEFAULT_GROW_BY };
        cache.reallocate(capacity)?;
        Ok(cache)
    }

    /// Positions added at once when the cache is full (at least 1).
    pub fn with_grow_by(mut self, grow_by: i64) -> Self {
        self.grow_by = grow_by.max(1);
        self
    }

    /// Positions already cached (the next forward's first position).
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    pub fn batch(&self) -> i64 {
        self.batch
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Drops every cached position, keeping the buffers.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    fn reallocate(&mut self, capacity: i64) -> Result<()> {
        let shape = [self.batch, self.kv_heads, capacity, self.head_dim];
        for layer in &mut self.layers {
            let k = Tensor::f_empty(shape, (layer.kind, layer.device))?;
            let v = Tensor::f_empty(shape, (layer.kind, layer.device))?;
            if self.len > 0 {
                k.f_narrow(2, 0, self.len)?.f_copy_(&layer.k.f_narrow(2, 0, self.len)?)?;
                v.f_narrow(2, 0, self.len)?.f_copy_(&layer.v.f_narrow(2, 0, self.len)?)?;
            }
            layer.k = k;
            layer.v = v;
        }
        self.capacity = capacity;
        Ok(())
    }

    /// Makes room for `new` more positions (growing by whole chunks).
    pub(crate) fn reserve(&mut self, new: i64) -> Result<()> {
        let needed = self.len + new;
        if needed > self.capacity {
            let chunks = (needed - self.capacity + self.grow_by - 1) / self.grow_by;
            self.reallocate(self.capacity + chunks * self.grow_by)?;
        }
        Ok(())
    }

    /// Writes layer `layer`'s new keys/values `[B, kv_heads, q_len, head_dim]` after the cached positions and
    /// returns views of all `len + q_len` positions (upstream `DynamicCache.update`).
    pub(crate) fn update(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let q_len = k.size().get(2).copied().unwrap_or(0);
        let expected = [self.batch, self.kv_heads, q_len, self.head_dim];
        if k.size() != expected || v.size() != expected {
            return Err(Error::InvalidInput(format!(
                "KV cache: keys {:?} / values {:?}, expected {expected:?}",
                k.size(),
                v.size()
            )));
        }
        if self.len + q_len > self.capacity {
            return Err(Error::InvalidInput("KV cache: update without reserve".into()));
        }
        let kv =
            self.layers.get_mut(layer).ok_or_else(|| Error::InvalidInput(format!("KV cache has no layer {layer}")))?;
        kv.k.f_narrow(2, self.len, q_len)?.f_copy_(k)?;
        kv.v.f_narrow(2, self.len, q_len)?.f_copy_(v)?;
        let total = self.len + q_len;
        Ok((kv.k.f_narrow(2, 0, total)?, kv.v.f_narrow(2, 0, total)?))
    }

    /// Marks `new` positions, written by every layer, as cached.
    pub(crate) fn advance(&mut self, new: i64) {
        self.len += new;
    }

    /// The rows of `parts` in one cache, each right-aligned at the longest length: shorter rows are
    /// left-padded with zeros, which the caller's attention mask hides (zeros, not garbage, because the
    /// masked weights multiply them). Room for `extra` more positions.
    pub fn stack_right_aligned(parts: &[&KvCache], extra: i64) -> Result<KvCache> {
        let first = parts.first().ok_or_else(|| Error::InvalidInput("KV cache: nothing to stack".into()))?;
        if parts.iter().any(|p| {
            p.layers.len() != first.layers.len() || p.kv_heads != first.kv_heads || p.head_dim != first.head_dim
        }) {
            return Err(Error::InvalidInput("KV cache: stacking caches of different models".into()));
        }
        let len = parts.iter().map(|p| p.len).max().unwrap_or(0);
        let batch = parts.iter().map(|p| p.batch).sum();
        let capacity = len + extra.max(0);
        let mut layers = Vec::with_capacity(first.layers.len());
        for layer in 0..first.layers.len() {
            let site = &first.layers[layer];
            let options = (site.kind, site.device);
            let shape = [batch, first.kv_heads, capacity, first.head_dim];
            let (k, v) = (Tensor::f_zeros(shape, options)?, Tensor::f_zeros(shape, options)?);
            let mut row = 0;
            for part in parts {
                let source = &part.layers[layer];
                for (target, from) in [(&k, &source.k), (&v, &source.v)] {
                    let rows = target.f_narrow(0, row, part.batch)?;
                    rows.f_narrow(2, len - part.len, part.len)?.f_copy_(&from.f_narrow(2, 0, part.len)?)?;
                }
                row += part.batch;
            }
            layers.push(LayerKv { k, v, kind: site.kind, device: site.device });
        }
        Ok(KvCache {
            layers,
            batch,
            kv_heads: first.kv_heads,
            head_dim: first.head_dim,
            capacity,
            len,
            grow_by: first.grow_by,
        })
    }

    /// A new cache holding a copy of this cache's first `len` positions, with room for `capacity`.
    pub fn copy_prefix(&self, len: i64, capacity: i64) -> Result<KvCache> {
        if !(0..=self.len).contains(&len) || capacity < len {
            return Err(Error::InvalidInput(format!(
                "KV cache: copying {len} of {} positions into room for {capacity}",
                self.len
            )));
        }
        let sites: Vec<(Kind, Device)> = self.layers.iter().map(|l| (l.kind, l.device)).collect();
        let mut copy = Self::with_sites(&sites, self.batch, self.kv_heads, self.head_dim, capacity)?;
        copy.grow_by = self.grow_by;
        for (target, source) in copy.layers.iter_mut().zip(&self.layers) {
            target.k.f_narrow(2, 0, len)?.f_copy_(&source.k.f_narrow(2, 0, len)?)?;
            target.v.f_narrow(2, 0, len)?.f_copy_(&source.v.f_narrow(2, 0, len)?)?;
        }
        copy.len = len;
        Ok(copy)
    }

    /// Bytes the cached positions take (keys and values of every layer), not counting spare room.
    pub fn cached_bytes(&self) -> usize {
        let per_position =
            |l: &LayerKv| (2 * self.batch * self.kv_heads * self.head_dim) as usize * l.kind.elt_size_in_bytes();
        self.layers.iter().map(per_position).sum::<usize>() * self.len as usize
    }

    /// Keeps the rows `rows` (in that order) and drops the first `trim` positions, which must be padding
    /// in every kept row.
    pub fn retain_rows(&mut self, rows: &[i64], trim: i64) -> Result<()> {
        if rows.is_empty() || rows.iter().any(|&r| r < 0 || r >= self.batch) || !(0..=self.len).contains(&trim) {
            return Err(Error::InvalidInput(format!(
                "KV cache: keeping rows {rows:?} of {} and trimming {trim} of {} positions",
                self.batch, self.len
            )));
        }
        let len = self.len - trim;
        let capacity = self.capacity - trim;
        for layer in &mut self.layers {
            let index = Tensor::f_from_slice(rows)?.f_to_device(layer.k.device())?;
            let keep = |t: &Tensor| -> Result<Tensor> {
                let kept = t.f_index_select(0, &index)?.f_narrow(2, trim, capacity)?;
                Ok(kept.f_contiguous()?)
            };
            layer.k = keep(&layer.k)?;
            layer.v = keep(&layer.v)?;
        }
        self.batch = rows.len() as i64;
        self.len = len;
        self.capacity = capacity;
        Ok(())
    }
}
