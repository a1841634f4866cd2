//! The engine on its own thread: a queue of requests in, one event channel out per request.
use super::events::{Completion, CompletionBuilder, Event};
use super::request::Request;
use super::reuse::{ReuseStats, ReuseStatsSnapshot};
use super::stats::{DecodeStats, DecodeStatsSnapshot};
use super::Engine;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

/// Cancels one answer before its next token; clones share the flag.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

pub(super) struct Job {
    pub request: Request,
    pub reply: Reply,
}

/// Where a queued request's events go, and its cancel flag.
pub(super) struct Reply {
    pub events: Sender<Result<Event>>,
    pub cancel: CancelToken,
}

/// Submits requests to the engine thread. Cheap to clone; send one to each thread that needs it.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: Sender<Job>,
    stats: Arc<DecodeStats>,
    reuse: Arc<ReuseStats>,
}

/// The events of one request as they come; ends after `Finished` or an error.
pub struct ResponseStream {
    events: Receiver<Result<Event>>,
    cancel: CancelToken,
}

impl EngineHandle {
    /// A handle feeding `jobs`, which the engine thread serves, counting its steps in `stats` and its
    /// reuse cache in `reuse`.
    pub(super) fn new(jobs: Sender<Job>, stats: Arc<DecodeStats>, reuse: Arc<ReuseStats>) -> Self {
        Self { jobs, stats, reuse }
    }

    /// The engine thread's decoding steps so far.
    pub fn decode_stats(&self) -> DecodeStatsSnapshot {
        self.stats.snapshot()
    }

    /// The engine's reuse cache: hits, misses, bytes held.
    pub fn reuse_stats(&self) -> ReuseStatsSnapshot {
        self.reuse.snapshot()
    }
}

impl EngineHandle {
    /// Queues `request`; its events come on the returned stream.
    pub fn submit(&self, request: Request) -> Result<ResponseStream> {
        self.submit_with(request, CancelToken::default())
    }

    /// Queues `request` with a cancel token the caller already holds (e.g. one that a watcher of the
    /// client's connection trips): a request cancelled while queued is dropped before any work.
    pub fn submit_with(&self, request: Request, cancel: CancelToken) -> Result<ResponseStream> {
        let (events, receiver) = channel();
        self.jobs
            .send(Job { request, reply: Reply { events, cancel: cancel.clone() } })
            .map_err(|_| Error::Engine("the engine thread has stopped".into()))?;
        Ok(ResponseStream { events: receiver, cancel })
    }

    /// Submits `request` and waits for its whole answer.
    pub fn complete(&self, request: Request) -> Result<Completion> {
        self.submit(request)?.completion()
    }
}

impl ResponseStream {
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    /// Waits for the rest of the answer.
    pub fn completion(self) -> Result<Completion> {
        let mut builder = CompletionBuilder::default();
        for event in self {
            builder.push(&event?);
        }
        builder.finish()
    }
}

impl Iterator for ResponseStream {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        self.events.recv().ok()
    }
}

#[allow(dead_code)]
fn assert_send() {
    fn send<T: Send>() {}
    send::<Engine>();
    send::<Request>();
    send::<EngineHandle>();
    send::<ResponseStream>();
    send::<CancelToken>();
}
