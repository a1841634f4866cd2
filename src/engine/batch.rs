//! Continuous batching on the engine thread: requests that arrive while others decode are prefilled
//! alone, then join the running batch; every decoding step runs one token of every running answer in
//! one forward, so the weights are read once per step for all of them (decoding is bound by reading
//! the weights). Rows are right-aligned in one KV cache, left-padded and masked, each with its own
//! positions, as transformers batches left-padded prompts. A finished or cancelled answer leaves the
//! batch at once.
//!
//! An answer alone in the batch computes exactly what [`Engine::generate`] computes. In a batch of
//! several, each projection multiplies several rows at once, which libtorch's GEMM sums in another
//! order than one row alone: the low bits differ, so a near-tie can go another way than solo.
//! Sampling draws from the process's one generator in step order, so a seeded request is reproducible
//! when it runs alone.
use super::answer::{Answer, Begun, Decoding};
use super::events::Event;
use super::handle::Job;
use super::Engine;
use crate::error::{Error, Result};
use crate::generate::{DecodeEnd, Flow, TokenChooser};
use crate::llm::KvCache;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Instant;
use tch::{Kind, Tensor};

/// One answer in the running batch.
struct Row<'e> {
    job: Job,
    answer: Answer<'e>,
    chooser: TokenChooser,
    last_token: i64,
    /// Tokens it may still generate.
    remaining: usize,
}

impl Row<'_> {
    fn emit(job: &Job) -> impl FnMut(Event) -> Flow + '_ {
        |event| {
            let delivered = job.events.send(Ok(event)).is_ok();
            if delivered && !job.cancel.is_cancelled() {
                Flow::Continue
            } else {
                Flow::Stop
            }
        }
    }

    /// Takes the chosen token; `Some(end)` when the answer is over.
    fn take(&mut self, token: i64, eos: &[i64]) -> Option<DecodeEnd> {
        self.last_token = token;
        self.remaining -= 1;
        let flow = self.answer.push(token, &mut Self::emit(&self.job));
        if eos.contains(&token) {
            Some(DecodeEnd::Eos)
        } else if flow == Flow::Stop {
            Some(DecodeEnd::Stopped)
        } else if self.remaining == 0 {
            Some(DecodeEnd::Length)
        } else {
            None
        }
    }

    fn finish(self, end: Option<DecodeEnd>) {
        finish(self.job, self.answer, end);
    }
}

/// Sends an answer's last events, or its error, to its requester.
fn finish(job: Job, answer: Answer, end: Option<DecodeEnd>) {
    let finished = answer.finish(end, &mut Row::emit(&job));
    if let Err(e) = finished {
        let _ = job.events.send(Err(e));
    }
}

/// The running batch: its rows, their KV cache and padding mask (`[rows, cached positions]`, int64).
struct Batch<'e> {
    rows: Vec<Row<'e>>,
    cache: Option<KvCache>,
    mask: Tensor,
}

/// Serves the queue until every handle is dropped, decoding up to `max_batch` answers at once.
pub(super) fn serve(engine: &Engine, queue: Receiver<Job>, max_batch: usize) {
    let _guard = tch::no_grad_guard();
    let mut batch = Batch { rows: Vec::new(), cache: None, mask: Tensor::new() };
    loop {
        // Block only when nothing is running; otherwise take what has arrived, up to the batch size.
        while batch.rows.len() < max_batch.max(1) {
            let job = if batch.rows.is_empty() {
                match queue.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                }
            } else {
                match queue.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if batch.rows.is_empty() => return,
                    Err(TryRecvError::Disconnected) => break,
                }
            };
            if let Err(e) = admit(engine, &mut batch, job) {
                tracing::warn!(error = %e, "a request could not join the batch");
            }
        }
        if batch.rows.is_empty() {
            continue;
        }
        if let Err(e) = step(engine, &mut batch) {
            // The shared state is unusable after a failed forward: every running answer gets the error.
            for row in batch.rows.drain(..) {
                let _ = row.job.events.send(Err(Error::Engine(format!("decoding step failed: {e}"))));
            }
            batch.cache = None;
        }
    }
}

/// Prefills `job` alone and, unless it is already over, adds it to the batch.
fn admit<'e>(engine: &'e Engine, batch: &mut Batch<'e>, job: Job) -> Result<()> {
    // Cancelled while it waited in the queue (its client left): no image decoding, vision or prefill.
    if job.cancel.is_cancelled() {
        return Ok(());
    }
    let begun = engine.begin(&job.request, Instant::now(), &mut Row::emit(&job));
    let Decoding { answer, inputs, chooser, max_new_tokens, mut cache } = match begun {
        // Cancelled while its images were prepared: the prefill is not run either.
        Ok(Begun::Decode(decoding)) if job.cancel.is_cancelled() => {
            finish(job, decoding.answer, Some(DecodeEnd::Stopped));
            return Ok(());
        }
        Ok(Begun::Decode(decoding)) => decoding,
        Ok(Begun::Over(answer)) => {
            finish(job, answer, None);
            return Ok(());
        }
        Err(e) => {
            let _ = job.events.send(Err(e));
            return Ok(());
        }
    };
    let model = engine.model();
    let prefilled = model
        .first_step(&inputs, engine.mask_policy, &mut cache)
        .and_then(|p| Ok((chooser.choose(&p.logits)?[0], p.mask)));
    let (first, mask) = match prefilled {
        Ok(first) => first,
        Err(e) => {
            let _ = job.events.send(Err(e));
            return Ok(());
        }
    };
    let mut row = Row { job, answer, chooser, last_token: first, remaining: max_new_tokens };
    if let Some(end) = row.take(first, &model.generation_config().eos_token_ids) {
        row.finish(Some(end));
        return Ok(());
    }
    // Join: every row right-aligned at the longest cached length, the padding masked.
    let mask = match (batch.cache.take(), batch.rows.is_empty()) {
        (Some(running), false) => {
            let headroom = batch.rows.iter().chain([&row]).map(|r| r.remaining as i64).max().unwrap_or(0);
            let joined = KvCache::stack_right_aligned(&[&running, &cache], headroom)?;
            let width = joined.len();
            let mask = Tensor::f_cat(&[&left_pad(&batch.mask, width)?, &left_pad(&mask, width)?], 0)?;
            batch.cache = Some(joined);
            mask
        }
        _ => {
            batch.cache = Some(cache);
            mask
        }
    };
    batch.mask = mask;
    batch.rows.push(row);
    Ok(())
}

/// `mask` `[rows, n]` with zero columns in front up to `width`.
fn left_pad(mask: &Tensor, width: i64) -> Result<Tensor> {
    let s = mask.size();
    if s[1] == width {
        return Ok(mask.shallow_clone());
    }
    let pad = Tensor::f_zeros([s[0], width - s[1]], (Kind::Int64, mask.device()))?;
    Ok(Tensor::f_cat(&[&pad, mask], 1)?)
}

/// One token for every running row; finished rows leave.
fn step(engine: &Engine, batch: &mut Batch) -> Result<()> {
    let model = engine.model();
    let cache = batch.cache.as_mut().ok_or_else(|| Error::Engine("a running batch without a cache".into()))?;
    let rows = batch.rows.len() as i64;
    let device = batch.mask.device();
    let ones = Tensor::f_ones([rows, 1], (Kind::Int64, device))?;
    batch.mask = Tensor::f_cat(&[&batch.mask, &ones], 1)?;
    let tokens: Vec<i64> = batch.rows.iter().map(|r| r.last_token).collect();
    let visual = Tensor::f_zeros([rows, 1], (Kind::Bool, device))?;
    let logits = model.token_step(&tokens, &batch.mask, &visual, cache)?;
    let eos = &model.generation_config().eos_token_ids;
    let mut ended = Vec::new();
    for (i, row) in batch.rows.iter_mut().enumerate() {
        let token = row.chooser.choose(&logits.f_narrow(0, i as i64, 1)?)?[0];
        if let Some(end) = row.take(token, eos) {
            ended.push((i, end));
        }
    }
    if ended.is_empty() {
        return Ok(());
    }
    let keep: Vec<i64> =
        (0..batch.rows.len()).filter(|i| !ended.iter().any(|(e, _)| e == i)).map(|i| i as i64).collect();
    for (i, end) in ended.into_iter().rev() {
        batch.rows.remove(i).finish(Some(end));
    }
    if keep.is_empty() {
        batch.cache = None;
        batch.mask = Tensor::new();
        return Ok(());
    }
    let index = Tensor::f_from_slice(&keep)?.f_to_device(device)?;
    let mask = batch.mask.f_index_select(0, &index)?;
    // Columns that are padding in every remaining row are dropped from the mask and the cache.
    let trim = mask.f_sum_dim_intlist(&[0i64][..], false, Kind::Int64)?.f_ne(0)?.f_to_kind(Kind::Int64)?;
    let trim = trim.f_argmax(0, false)?.f_int64_value(&[])?;
    cache.retain_rows(&keep, trim)?;
    batch.mask = mask.f_narrow(1, trim, mask.size()[1] - trim)?;
    Ok(())
}
