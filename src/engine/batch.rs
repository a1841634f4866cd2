//! Continuous batching on the engine thread: requests that arrive while others decode are prefilled
//! alone, then join the running batch. A prefill runs between two decoding steps, whole, or with
//! `EngineOptions::prefill_chunk` one chunk per step, so that a long prompt joining delays the running
//! answers by a chunk at a time rather than by its whole prefill; every decoding step runs one token of every running answer in
//! one forward, so the weights are read once per step for all of them (decoding is bound by reading
//! the weights). Rows are right-aligned in one KV cache, left-padded and masked, each with its own
//! positions, as transformers batches left-padded prompts. A finished or cancelled answer leaves the
//! batch at once.
//!
//! An answer alone in the batch computes exactly what [`Engine::generate`] computes. In a batch of
//! several, each row attends over its own keys only (not over the padding in front of it), so its
//! attention adds the same terms in the same order as alone. What remains shared is the projections'
//! GEMM: libtorch's fp32 GEMM sums several rows in another order than one row alone, so in the exact
//! and fp16 modes the low bits differ and a near-tie can go another way than solo. The int8 GEMM
//! quantizes each row on its own grid and its integer products are exact: with the language branch
//! merged (`--load-8bit --merge-lora`), a batched answer equals its solo answer to the bit.
//! Sampling draws from the process's one generator in step order, so a seeded request is reproducible
//! when it runs alone.
use super::answer::{Answer, Begun, Decoding};
use super::events::{Completion, CompletionBuilder, Event};
use super::handle::{Job, Reply};
use super::request::Request;
use super::stats::{DecodeStats, StepTally};
use super::Engine;
use crate::error::{Error, Result};
use crate::generate::{DecodeEnd, Flow, Picked, Picker};
use crate::llm::KvCache;
use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Instant;
use tch::{Kind, Tensor};

/// Where one answer's events go: a queued request's channel, or the caller of [`Engine::generate`].
pub(super) trait Requester {
    /// Delivers an event; `Stop` when the requester wants no more.
    fn emit(&mut self, event: Event) -> Flow;
    /// Delivers the error that ended the answer.
    fn fail(&mut self, error: Error);
    fn is_cancelled(&self) -> bool;
}

impl Requester for Reply {
    fn emit(&mut self, event: Event) -> Flow {
        let delivered = self.events.send(Ok(event)).is_ok();
        if delivered && !self.cancel.is_cancelled() {
            Flow::Continue
        } else {
            Flow::Stop
        }
    }

    fn fail(&mut self, error: Error) {
        let _ = self.events.send(Err(error));
    }

    fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// The caller of [`Engine::generate`]: its callback, the answer gathered, the error that ended it.
struct Caller<F> {
    on_event: F,
    completion: CompletionBuilder,
    error: Option<Error>,
}

impl<F: FnMut(Event) -> Flow> Requester for &mut Caller<F> {
    fn emit(&mut self, event: Event) -> Flow {
        self.completion.push(&event);
        (self.on_event)(event)
    }

    fn fail(&mut self, error: Error) {
        self.error.get_or_insert(error);
    }

    fn is_cancelled(&self) -> bool {
        false
    }
}

/// One answer in the running batch.
struct Row<'e, R> {
    requester: R,
    answer: Answer<'e>,
    picker: Picker,
    last_token: i64,
    /// Tokens it may still generate.
    remaining: usize,
}

impl<R: Requester> Row<'_, R> {
    /// Picks the next token from the row's logits `[1, vocab]` and takes it; `Some(end)` when the
    /// answer is over.
    fn pick_and_take(&mut self, logits: &Tensor, eos: &[i64], tally: &mut StepTally) -> Result<Option<DecodeEnd>> {
        let Some(picked) = self.picker.pick(logits)? else { return Ok(Some(DecodeEnd::NoAllowedToken)) };
        tally.tokens += 1;
        if self.picker.is_constrained() {
            tally.constrained_tokens += 1;
            tally.constraint_time += picked.constraint_time;
        }
        Ok(self.take(&picked, eos))
    }

    fn take(&mut self, picked: &Picked, eos: &[i64]) -> Option<DecodeEnd> {
        self.last_token = picked.id;
        self.remaining -= 1;
        let requester = &mut self.requester;
        let flow = self.answer.push(picked, &mut |event| requester.emit(event));
        if eos.contains(&picked.id) {
            Some(DecodeEnd::Eos)
        } else if flow == Flow::Stop {
            Some(DecodeEnd::Stopped)
        } else if picked.constraint_complete {
            Some(DecodeEnd::Complete)
        } else if self.remaining == 0 {
            Some(DecodeEnd::Length)
        } else {
            None
        }
    }

    fn finish(self, end: Option<DecodeEnd>) {
        finish(self.requester, self.answer, end);
    }
}

/// Sends an answer's last events, or its error, to its requester.
fn finish<R: Requester>(mut requester: R, answer: Answer, end: Option<DecodeEnd>) {
    let finished = answer.finish(end, &mut |event| requester.emit(event));
    if let Err(e) = finished {
        requester.fail(e);
    }
}

/// The running batch: its rows, their KV cache and padding mask (`[rows, cached positions]`, int64).
struct Batch<'e, R> {
    rows: Vec<Row<'e, R>>,
    cache: Option<KvCache>,
    mask: Tensor,
}

impl<R> Batch<'_, R> {
    fn new() -> Self {
        Batch { rows: Vec::new(), cache: None, mask: Tensor::new() }
    }
}

/// [`Engine::generate`]: the one request as a batch of one, decoded until it is over.
pub(super) fn answer_alone(
    engine: &Engine,
    request: &Request,
    on_event: impl FnMut(Event) -> Flow,
) -> Result<Completion> {
    let _guard = tch::no_grad_guard();
    let mut caller = Caller { on_event, completion: CompletionBuilder::default(), error: None };
    {
        let mut batch = Batch::new();
        let stats = DecodeStats::default();
        admit(engine, &mut batch, request, &mut caller);
        while !batch.rows.is_empty() {
            step_or_fail(engine, &mut batch, &stats);
        }
    }
    match caller.error {
        Some(e) => Err(e),
        None => caller.completion.finish(),
    }
}

/// Serves the queue until every handle is dropped, decoding up to `max_batch` answers at once; each
/// decoding step is counted in `stats`.
pub(super) fn serve(engine: &Engine, queue: Receiver<Job>, max_batch: usize, stats: &DecodeStats) {
    let _guard = tch::no_grad_guard();
    let mut batch = Batch::new();
    // Requests being prefilled: one part (a chunk with `prefill_chunk`, else a whole prompt) between
    // two decoding steps, so that a long prompt joining does not stall the running answers.
    let mut joining = VecDeque::new();
    loop {
        // Block only when nothing is running; otherwise take what has arrived, up to the batch size.
        while batch.rows.len() + joining.len() < max_batch.max(1) {
            let idle = batch.rows.is_empty() && joining.is_empty();
            let job = if idle {
                match queue.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                }
            } else {
                match queue.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            };
            let Job { request, reply } = job;
            joining.extend(begin_joining(engine, &request, reply));
        }
        if let Some(next) = joining.pop_front() {
            if let Some(rest) = prefill_next(engine, &mut batch, next) {
                joining.push_front(rest);
            }
        }
        if !batch.rows.is_empty() {
            step_or_fail(engine, &mut batch, stats);
        }
    }
}

/// One step; when it fails, the shared state is unusable: every running answer gets the error.
fn step_or_fail<R: Requester>(engine: &Engine, batch: &mut Batch<R>, stats: &DecodeStats) {
    if let Err(e) = step(engine, batch, stats) {
        for mut row in batch.rows.drain(..) {
            row.requester.fail(Error::Engine(format!("decoding step failed: {e}")));
        }
        batch.cache = None;
    }
}

/// A request whose prompt is being prefilled, a part at a time, before it joins the batch.
struct Joining<'e, R> {
    requester: R,
    decoding: Decoding<'e>,
}

/// Prefills `request` and, unless it is already over, adds it to the batch; errors go to its requester.
fn admit<'e, R: Requester>(engine: &'e Engine, batch: &mut Batch<'e, R>, request: &Request, requester: R) {
    let mut joining = begin_joining(engine, request, requester);
    while let Some(j) = joining {
        joining = prefill_next(engine, batch, j);
    }
}

/// Starts the answer to `request`; `None` when it is over already (its requester has been told).
fn begin_joining<'e, R: Requester>(engine: &'e Engine, request: &Request, mut requester: R) -> Option<Joining<'e, R>> {
    // Cancelled while it waited in the queue (its client left): no image decoding, vision or prefill.
    if requester.is_cancelled() {
        return None;
    }
    match engine.begin(request, Instant::now(), &mut |event| requester.emit(event)) {
        // Cancelled while its images were prepared: the prefill is not run either.
        Ok(Begun::Decode(decoding)) if requester.is_cancelled() => {
            finish(requester, decoding.answer, Some(DecodeEnd::Stopped));
            None
        }
        Ok(Begun::Decode(decoding)) => Some(Joining { requester, decoding }),
        Ok(Begun::Over(answer)) => {
            finish(requester, answer, None);
            None
        }
        Err(e) => {
            requester.fail(e);
            None
        }
    }
}

/// Runs the next part of a joining request's prefill; after the last, takes its first token and adds
/// it to the batch. Returns the request while parts remain.
fn prefill_next<'e, R: Requester>(
    engine: &'e Engine,
    batch: &mut Batch<'e, R>,
    mut joining: Joining<'e, R>,
) -> Option<Joining<'e, R>> {
    // Left mid-prefill: its partial cache goes with it, and nothing of it was kept for reuse.
    if joining.requester.is_cancelled() {
        finish(joining.requester, joining.decoding.answer, Some(DecodeEnd::Stopped));
        return None;
    }
    let prefilled = match engine.prefill_next(&mut joining.decoding) {
        Ok(Some(prefilled)) => prefilled,
        Ok(None) => return Some(joining),
        Err(e) => {
            joining.requester.fail(e);
            return None;
        }
    };
    let Joining { requester, decoding: Decoding { answer, picker, max_new_tokens, cache, .. } } = joining;
    let mut row = Row { requester, answer, picker, last_token: 0, remaining: max_new_tokens };
    // The first token belongs to the prefill, not to a decoding step.
    let mut prefill = StepTally::default();
    match row.pick_and_take(&prefilled.logits, &engine.model().generation_config().eos_token_ids, &mut prefill) {
        Ok(None) => {}
        Ok(Some(end)) => {
            row.finish(Some(end));
            return None;
        }
        Err(e) => {
            row.requester.fail(e);
            return None;
        }
    }
    if let Err(e) = join(batch, row, cache, prefilled.mask) {
        tracing::warn!(error = %e, "a request could not join the batch");
    }
    None
}

/// Adds a prefilled row: every row right-aligned at the longest cached length, the padding masked.
fn join<'e, R: Requester>(batch: &mut Batch<'e, R>, mut row: Row<'e, R>, cache: KvCache, mask: Tensor) -> Result<()> {
    let joined = match (batch.cache.take(), batch.rows.is_empty()) {
        (Some(running), false) => {
            let headroom = batch.rows.iter().chain([&row]).map(|r| r.remaining as i64).max().unwrap_or(0);
            KvCache::stack_right_aligned(&[&running, &cache], headroom).and_then(|joined| {
                let width = joined.len();
                let mask = Tensor::f_cat(&[&left_pad(&batch.mask, width)?, &left_pad(&mask, width)?], 0)?;
                Ok((joined, mask))
            })
        }
        _ => Ok((cache, mask)),
    };
    match joined {
        Ok((cache, mask)) => {
            batch.cache = Some(cache);
            batch.mask = mask;
            batch.rows.push(row);
            Ok(())
        }
        Err(e) => {
            // The running rows lost their cache with it.
            for mut running in batch.rows.drain(..) {
                running.requester.fail(Error::Engine(format!("joining the batch failed: {e}")));
            }
            row.requester.fail(Error::Engine(format!("joining the batch failed: {e}")));
            Err(e)
        }
    }
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
fn step<R: Requester>(engine: &Engine, batch: &mut Batch<R>, stats: &DecodeStats) -> Result<()> {
    let started = Instant::now();
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
    let mut tally = StepTally::default();
    for (i, row) in batch.rows.iter_mut().enumerate() {
        // A row whose choice fails (its constraint) ends alone; the others go on.
        match row.pick_and_take(&logits.f_narrow(0, i as i64, 1)?, eos, &mut tally) {
            Ok(None) => {}
            Ok(Some(end)) => ended.push((i, Ok(end))),
            Err(e) => ended.push((i, Err(e))),
        }
    }
    stats.record(&tally, started.elapsed());
    if ended.is_empty() {
        return Ok(());
    }
    let keep: Vec<i64> =
        (0..batch.rows.len()).filter(|i| !ended.iter().any(|(e, _)| e == i)).map(|i| i as i64).collect();
    for (i, end) in ended.into_iter().rev() {
        let mut row = batch.rows.remove(i);
        match end {
            Ok(end) => row.finish(Some(end)),
            Err(e) => row.requester.fail(e),
        }
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
